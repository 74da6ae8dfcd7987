"""Lesion-wise tumor scores (flare23.evaluation.lesions) and their outputs in ``flare23 evaluate``.

Expected rows come from an independent, deliberately naive computation in this file (scipy.ndimage.label
on the whole volume, full-volume dilations and ``np.isin``), plus hand-computed values for the key cases.
"""

from __future__ import annotations

import csv
import json
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from flare23.constants import LABEL_KEYS
from flare23.evaluation.lesions import LESION_COLUMNS, lesion_rows, size_bin, summarize_lesions

TUMOR = 14
FULL = np.ones((3, 3, 3), bool)
ZOOMS = (2.0, 2.0, 2.0)  # 8 mm^3 = 0.008 ml per voxel
AFFINE = np.diag([*ZOOMS, 1.0])

# hand-placed blobs of the synthetic case (see ``scene``)
BIG = np.s_[4:15, 4:15, 4:15]  # 11^3 = 1331 voxels = 10.648 ml, inside the liver
MEDIUM = np.s_[25:30, 25:30, 25:30]  # 5^3 = 125 voxels = 1.0 ml exactly (bin "1-10"), no organ around
CORNER = (np.s_[25:27, 5:7, 5:7], np.s_[27:29, 7:9, 7:9])  # two 2^3 cubes touching at one corner, in the spleen
SPLIT = (np.s_[4:9, 4:15, 4:15], np.s_[11:16, 4:15, 4:15])  # the prediction of BIG, in two pieces
FP = (np.s_[17:19, 17:19, 17:19], np.s_[35:38, 35:38, 35:38])  # false positives: in the liver, in the air


def scene():
    """``(ref, pred)``: a big split lesion, a missed 1 ml lesion, a small corner-connected lesion, two false positives."""
    ref = np.zeros((40, 40, 40), np.uint8)
    ref[0:20, 0:20, 0:20] = 1  # liver
    ref[22:32, 0:12, 0:12] = 3  # spleen
    pred = ref.copy()
    ref[BIG] = TUMOR
    ref[MEDIUM] = TUMOR
    for s in CORNER:
        ref[s] = TUMOR
    for s in SPLIT + FP + CORNER[:1]:
        pred[s] = TUMOR
    return ref, pred


def expected_rows(case, ref, pred, zooms=ZOOMS):
    """Independent rows: full-volume labelling, dilation, isin and Counter."""
    voxel_ml = np.prod(zooms) / 1000.0
    ref_lab, n_ref = ndimage.label(ref == TUMOR, structure=FULL)
    pred_lab, n_pred = ndimage.label(pred == TUMOR, structure=FULL)

    def host(mask):
        shell = ndimage.binary_dilation(mask, structure=FULL) & ~mask
        counts = Counter(int(v) for v in ref[shell] if 1 <= v <= 13)
        return LABEL_KEYS[min(counts, key=lambda c: (-counts[c], c))] if counts else ""

    rows = []
    for i in range(1, n_ref + 1):
        lesion = ref_lab == i
        ids = [j for j in range(1, n_pred + 1) if np.any(lesion & (pred_lab == j))]
        union = np.isin(pred_lab, ids)
        dsc = 2.0 * np.sum(lesion & union) / (lesion.sum() + union.sum()) if ids else 0.0
        rows.append([case, str(i), int(lesion.sum()), lesion.sum() * voxel_ml, host(lesion), int(bool(ids)), dsc])
    k = 0
    for j in range(1, n_pred + 1):
        comp = pred_lab == j
        if not np.any(comp & (ref == TUMOR)):
            k += 1
            rows.append([case, f"fp{k}", int(comp.sum()), comp.sum() * voxel_ml, host(comp), None, None])
    return rows


def as_lists(rows):
    return [[r[c] for c in LESION_COLUMNS] for r in rows]


def assert_rows_equal(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g[:3] == e[:3] and g[4] == e[4] and g[5] == e[5], (g, e)
        assert g[3] == pytest.approx(e[3], rel=1e-12)
        assert (g[6] is None and e[6] is None) or g[6] == pytest.approx(e[6], abs=1e-12)


def test_scene_rows_match_the_independent_count_and_hand_values():
    ref, pred = scene()
    got = lesion_rows("a", ref, pred, ZOOMS)
    assert_rows_equal(as_lists(got), expected_rows("a", ref, pred))
    by_name = {r["lesion"]: r for r in got}
    assert list(by_name) == ["1", "2", "3", "fp1", "fp2"]  # labelling order: BIG, CORNER, MEDIUM, then the fps
    big, corner, medium = by_name["1"], by_name["2"], by_name["3"]
    # BIG is split in two predicted components (605 voxels inside, 605 with 484 inside): one row, Dice of the union
    assert ndimage.label(ref == TUMOR, structure=FULL)[1] == 3
    assert big["voxels"] == 1331 and big["detected"] == 1 and big["host"] == "liver"
    assert big["dsc"] == pytest.approx(2 * (605 + 484) / (1331 + 605 + 605), abs=1e-15)
    assert big["volume_ml"] == pytest.approx(10.648)
    # MEDIUM: missed, no organ around
    assert medium == {"case": "a", "lesion": "3", "voxels": 125, "volume_ml": 1.0, "host": "", "detected": 0, "dsc": 0.0}
    # CORNER: one lesion of two cubes touching at a corner (two with 6-connectivity), half predicted
    assert ndimage.label(ref[20:32, 0:12, 0:12] == TUMOR)[1] == 2
    assert corner["voxels"] == 16 and corner["host"] == "spleen" and corner["detected"] == 1
    assert corner["dsc"] == pytest.approx(2 * 8 / (16 + 8), abs=1e-15)
    # false positives: in the liver, then in the air; detected / dsc empty
    assert (by_name["fp1"]["voxels"], by_name["fp1"]["host"]) == (8, "liver")
    assert (by_name["fp2"]["voxels"], by_name["fp2"]["host"]) == (27, "")
    assert by_name["fp1"]["detected"] is None and by_name["fp2"]["dsc"] is None


def test_a_predicted_component_over_two_lesions_counts_for_both():
    ref = np.zeros((20, 12, 12), np.uint8)
    ref[2:6, 2:6, 2:6] = TUMOR  # 64 voxels
    ref[8:10, 2:6, 2:6] = TUMOR  # 32 voxels, one empty slice away
    pred = np.zeros_like(ref)
    pred[2:10, 2:6, 2:6] = TUMOR  # 128 voxels, one component over both
    got = lesion_rows("m", ref, pred, ZOOMS)
    assert_rows_equal(as_lists(got), expected_rows("m", ref, pred))
    assert [r["lesion"] for r in got] == ["1", "2"] and all(r["detected"] == 1 for r in got)
    assert got[0]["dsc"] == pytest.approx(2 * 64 / (64 + 128)) and got[1]["dsc"] == pytest.approx(2 * 32 / (32 + 128))


def test_host_is_the_majority_organ_of_the_shell_and_lesions_at_the_border():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[:, :, :5] = 1  # liver
    ref[:, :, 5:] = 11  # stomach
    ref[0:3, 0:3, 5:7] = TUMOR  # at the image corner, in the stomach, touching the liver on one side
    ref[6:9, 6:9, 1:3] = TUMOR  # inside the liver
    rows = lesion_rows("h", ref, np.zeros_like(ref), (1.0, 1.0, 1.0))
    assert_rows_equal(as_lists(rows), expected_rows("h", ref, np.zeros_like(ref), (1.0, 1.0, 1.0)))
    assert [r["host"] for r in rows] == ["stomach", "liver"]
    assert [r["volume_ml"] for r in rows] == [0.018, 0.018]


def test_random_volumes_match_the_independent_count():
    rng = np.random.default_rng(7)
    for seed in range(3):
        ref = rng.integers(0, 4, (14, 12, 10)).astype(np.uint8)
        ref[ndimage.binary_opening(rng.random(ref.shape) < 0.35)] = TUMOR
        pred = ref.copy()
        pred[pred == TUMOR] = 1
        pred[ndimage.binary_opening(rng.random(ref.shape) < 0.35)] = TUMOR
        zooms = (0.8, 1.1, 2.5)
        got = lesion_rows(f"r{seed}", ref, pred, zooms)
        assert_rows_equal(as_lists(got), expected_rows(f"r{seed}", ref, pred, zooms))


def test_no_tumor_anywhere_and_size_bins():
    empty = np.zeros((5, 5, 5), np.uint8)
    assert lesion_rows("e", empty, empty, ZOOMS) == []
    summary = summarize_lesions([], 2)
    assert summary["recall_by_size"]["all"] == {"n": 0, "detected": 0, "recall": None}
    assert summary["mean_lesion_dsc"] is None and summary["fp_components_per_case"] == 0.0
    assert [size_bin(v) for v in (0.0, 0.999, 1.0, 5.0, 10.0, 10.001)] == ["<1", "<1", "1-10", "1-10", "1-10", ">10"]


# --- flare23 evaluate ------------------------------------------------------------------------------------------------


def save(arr, affine, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr, affine)
    img.set_data_dtype(arr.dtype)
    nib.save(img, str(path))


def read_lesions(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_evaluate_writes_lesions_csv_and_summary(tmp_path, capsys):
    from flare23.cli import main

    ref, pred = scene()
    save(ref, AFFINE, tmp_path / "ref" / "a.nii.gz")
    save(ref, AFFINE, tmp_path / "ref" / "b.nii.gz")  # no prediction: scored as empty, every lesion missed
    save(pred, AFFINE, tmp_path / "pred" / "a.nii.gz")
    main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "ref"), "--out", str(tmp_path / "out")])
    capsys.readouterr()
    header, rows = read_lesions(tmp_path / "out" / "lesions.csv")
    assert header == ["case", "lesion", "voxels", "volume_ml", "host", "detected", "dsc"]
    expected = expected_rows("a", ref, pred) + expected_rows("b", ref, np.zeros_like(ref))
    parsed = [
        [r[0], r[1], int(r[2]), float(r[3]), r[4], int(r[5]) if r[5] else None, float(r[6]) if r[6] else None] for r in rows
    ]
    assert_rows_equal(parsed, expected)
    assert [r[1] for r in rows] == ["1", "2", "3", "fp1", "fp2", "1", "2", "3"]
    assert [r[5] for r in rows if r[0] == "b"] == ["0", "0", "0"]

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    lesions = summary["lesions"]
    big_dsc, corner_dsc = 2 * 1089 / 2541, 2 / 3
    assert lesions["recall_by_size"] == {
        "<1": {"n": 2, "detected": 1, "recall": 0.5},
        "1-10": {"n": 2, "detected": 0, "recall": 0.0},
        ">10": {"n": 2, "detected": 1, "recall": 0.5},
        "all": {"n": 6, "detected": 2, "recall": pytest.approx(1 / 3)},
    }
    assert lesions["fp_components_total"] == 2 and lesions["fp_components_per_case"] == 1.0
    assert lesions["mean_lesion_dsc"] == pytest.approx((big_dsc + corner_dsc) / 6, abs=1e-12)
    assert summary["missing"] == ["b"] and summary["n_cases"] == 2  # FLARE's keys are still there

    # the same prediction on a reoriented grid (nibabel's as_reoriented) gives the very same lesion rows
    img = nib.Nifti1Image(pred, AFFINE)
    codes = ("P", "S", "L")
    out = img.as_reoriented(
        nib.orientations.ornt_transform(nib.orientations.io_orientation(AFFINE), nib.orientations.axcodes2ornt(codes))
    )
    assert nib.aff2axcodes(out.affine) == codes
    save(np.asarray(out.dataobj), out.affine, tmp_path / "pred_r" / "a.nii.gz")
    main(["evaluate", str(tmp_path / "pred_r"), str(tmp_path / "ref"), "--out", str(tmp_path / "out_r")])
    capsys.readouterr()
    assert (tmp_path / "out_r" / "lesions.csv").read_text() == (tmp_path / "out" / "lesions.csv").read_text()
    assert json.loads((tmp_path / "out_r" / "summary.json").read_text())["reoriented"] == ["a"]
