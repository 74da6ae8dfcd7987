"""``flare23 evaluate`` on prediction grids other than the reference's (flare23.data.grids, flare23.evaluation.evaluate).

Reoriented copies are made with nibabel's own ``as_reoriented`` (not with flare23.data.grids), and
scores are checked against plain numpy / surface-distance computations.
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import surface_distance as sd
from scipy import ndimage

from flare23.constants import FOREGROUND_IDS, NSD_TOLERANCE_MM
from flare23.data.grids import equivalent_transform, resample_nearest, to_reference_grid
from flare23.errors import Flare23Error
from flare23.evaluation.evaluate import evaluate_folders

pytestmark = pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")  # surface-distance's scipy aliases


def save(arr, affine, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr, affine)
    img.set_data_dtype(arr.dtype)
    nib.save(img, str(path))


def reoriented(arr, affine, codes):
    """``arr`` / ``affine`` rewritten in the axis codes ``codes`` by nibabel (same voxel centres in the world)."""
    img = nib.Nifti1Image(arr, affine)
    tr = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(codes))
    out = img.as_reoriented(tr)
    assert nib.aff2axcodes(out.affine) == tuple(codes)
    return np.asarray(out.dataobj), out.affine


def read_rows(path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return {r[0]: np.array([float(v) for v in r[1:]]).reshape(14, 2) for r in rows}


def dice(a, b) -> float:
    return 1.0 if not a.any() and not b.any() else 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def perturb(ref):
    """A prediction that differs from ``ref`` asymmetrically: eroded liver, grown spleen, half a stomach."""
    pred = ref.copy()
    pred[(ref == 1) & ~ndimage.binary_erosion(ref == 1)] = 0
    pred[ndimage.binary_dilation(ref == 3) & (pred == 0)] = 3
    stomach = np.argwhere(ref == 11)
    pred[(ref == 11) & (np.arange(ref.shape[0])[:, None, None] < np.median(stomach[:, 0]))] = 0
    return pred


# (label file fixture, two other orientations of the same grid: one flipped axis, one permutation with flips)
REAL = {
    "ct": ("real_ct_dir", [("L", "A", "S"), ("S", "L", "P")]),
    "dicom": ("real_dicom_dir", [("L", "P", "S"), ("A", "S", "R")]),
}


@pytest.fixture(scope="module", params=sorted(REAL))
def real_case(request, tmp_path_factory):
    folder = request.getfixturevalue(REAL[request.param][0])
    img = nib.load(str(folder / "label_flare.nii.gz"))
    ref = np.asarray(img.dataobj).astype(np.uint8)
    pred = perturb(ref)
    root = tmp_path_factory.mktemp(f"grids_{request.param}")
    save(ref, img.affine, root / "ref" / "ts.nii.gz")
    save(pred, img.affine, root / "pred_a" / "ts.nii.gz")
    evaluate_folders(root / "pred_a", root / "ref", root / "out_a", progress=False)
    return {"root": root, "ref": ref, "pred": pred, "affine": img.affine, "codes": REAL[request.param][1]}


def test_reference_grid_scores_are_right(real_case):
    """(a), the prediction on the reference grid, against numpy DSC and surface-distance NSD."""
    ref, pred = real_case["ref"], real_case["pred"]
    got = read_rows(real_case["root"] / "out_a" / "per_case.csv")["ts"]
    spacing = nib.load(str(real_case["root"] / "ref" / "ts.nii.gz")).header.get_zooms()[:3]
    for i, c in enumerate(FOREGROUND_IDS):
        if c not in (5, 6, 10):  # slab-restricted classes are checked in test_evaluation.py
            assert got[i, 0] == pytest.approx(dice(ref == c, pred == c), abs=1e-12), c
    liver_nsd = sd.compute_surface_dice_at_tolerance(
        sd.compute_surface_distances(ref == 1, pred == 1, spacing), NSD_TOLERANCE_MM[1]
    )
    assert got[0, 1] == pytest.approx(liver_nsd, abs=1e-6)
    assert 0.5 < got[0, 0] < 0.99 and 0.5 < got[2, 0] < 0.99  # liver and spleen really perturbed


@pytest.mark.parametrize("variant", [0, 1])
def test_reoriented_prediction_scores_exactly_as_on_the_reference_grid(real_case, variant, tmp_path, capsys):
    from flare23.cli import main

    root, ref, pred = real_case["root"], real_case["ref"], real_case["pred"]
    codes = real_case["codes"][variant]
    arr, affine = reoriented(pred, real_case["affine"], codes)
    assert not np.array_equal(real_case["affine"], affine)
    save(arr, affine, tmp_path / "pred" / "ts.nii.gz")
    main(["evaluate", str(tmp_path / "pred"), str(root / "ref"), "--out", str(tmp_path / "out")])
    capsys.readouterr()
    # every metric of every organ: the very same floats as on the reference grid
    assert (tmp_path / "out" / "per_case.csv").read_text() == (root / "out_a" / "per_case.csv").read_text()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["reoriented"] == ["ts"] and summary["resampled"] == []
    # scoring the array as stored (the old behaviour) would give other numbers, or no numbers at all
    if arr.shape == ref.shape:
        assert abs(dice(ref == 1, arr == 1) - dice(ref == 1, pred == 1)) > 0.1
    else:
        assert variant == 1


def test_non_equivalent_grid_is_refused_unless_resampled(real_case, tmp_path, capsys):
    from flare23.cli import main

    root, pred, affine = real_case["root"], real_case["pred"], real_case["affine"]
    assert not pred[0].any() and not pred[1].any() and not pred[-1].any()
    # the prediction's grid is shifted by 2/3 voxel along the first axis (2 mm for the 3 mm CT); its content
    # by one voxel, so that the nearest-neighbour resampling onto the reference grid gives back ``pred`` exactly
    shifted = np.zeros_like(pred)
    shifted[:-1] = pred[1:]
    moved = affine.copy()
    moved[:3, 3] += affine[:3, 0] * (2.0 / 3.0)
    save(shifted, moved, tmp_path / "pred" / "ts.nii.gz")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tmp_path / "pred"), str(root / "ref"), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flare23: error: case ts:") and "--resample nearest" in err[0]
    assert err[0].count(f"shape {tuple(pred.shape)}") == 2
    assert not (out / "per_case.csv").exists() and not (out / "summary.json").exists()

    main(["evaluate", str(tmp_path / "pred"), str(root / "ref"), "--out", str(out), "--resample", "nearest"])
    assert "1 resampled (nearest): ts" in capsys.readouterr().out  # also a warning in the log
    assert (out / "per_case.csv").read_text() == (root / "out_a" / "per_case.csv").read_text()
    assert json.loads((out / "summary.json").read_text())["resampled"] == ["ts"]


# --- synthetic grids -----------------------------------------------------------------------------------------------


def oblique_affine(angle, spacing, origin):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.array(
        [[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]]
    )
    out = np.eye(4)
    out[:3, :3] = rot * np.asarray(spacing, float)
    out[:3, 3] = origin
    return out


def test_equivalent_transform_tolerance_and_oblique_grids():
    rng = np.random.default_rng(1)
    shape = (12, 10, 8)
    data = rng.integers(0, 15, shape).astype(np.uint8)
    ref_aff = oblique_affine(0.5, (0.8, 1.1, 2.5), (-40.0, 12.0, 300.0))
    arr, aff = reoriented(data, ref_aff, ("I", "R", "P") if nib.aff2axcodes(ref_aff) != ("I", "R", "P") else ("S", "L", "A"))
    back, how = to_reference_grid(arr, aff, shape, ref_aff, "c")
    assert how == "reoriented" and np.array_equal(back, data)
    # the same grid moved by 1e-4 mm is equivalent, by 1e-2 mm (or 1e-2 in one spacing) it is not
    for delta, ok in [(1e-4, True), (1e-2, False)]:
        moved = aff.copy()
        moved[:3, 3] += delta / np.sqrt(3)
        assert (equivalent_transform(arr.shape, moved, shape, ref_aff) is not None) is ok
    stretched = aff.copy()
    stretched[:3, 0] *= 1 + 1e-2 / np.linalg.norm(aff[:3, 0]) / shape[0]
    assert equivalent_transform(arr.shape, stretched, shape, ref_aff) is None
    with pytest.raises(Flare23Error, match=r"case c: .*is not the reference grid"):
        to_reference_grid(arr, stretched, shape, ref_aff, "c")
    with pytest.raises(Flare23Error, match="resample 'linear'"):
        to_reference_grid(arr, aff, shape, ref_aff, "c", resample="linear")


def test_resample_nearest_matches_scipy_map_coordinates():
    rng = np.random.default_rng(2)
    data = rng.integers(1, 15, (20, 22, 18)).astype(np.uint8)
    aff = oblique_affine(0.2, (1.3, 0.9, 2.0), (3.0, -4.0, 5.0))
    ref_shape, ref_aff = (17, 15, 13), oblique_affine(-0.4, (1.5, 1.5, 1.7), (1.0, 2.0, 4.0))
    got = resample_nearest(data, aff, ref_shape, ref_aff)
    idx = np.indices(ref_shape).reshape(3, -1)
    coords = (np.linalg.inv(aff) @ ref_aff @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]
    expected = ndimage.map_coordinates(data, coords, order=0, mode="nearest").reshape(ref_shape)
    n = np.array(data.shape)[:, None]
    inside = np.all((coords > 1e-6) & (coords < n - 1 - 1e-6), axis=0).reshape(ref_shape)
    outside = np.any((coords < -0.5 - 1e-6) | (coords > n - 0.5 + 1e-6), axis=0).reshape(ref_shape)
    assert inside.sum() > 300 and outside.sum() > 300
    assert np.array_equal(got[inside], expected[inside])
    assert not got[outside].any() and got[inside].all()


# --- skip_missing and atomic outputs --------------------------------------------------------------------------------


@pytest.fixture()
def three_refs(tmp_path):
    rng = np.random.default_rng(3)
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    refs = {}
    for case in ("a", "b", "c"):
        ref = np.zeros((24, 22, 16), np.uint8)
        ref[4:14, 5:15, 3:12] = 1
        ref[15:20, 6:12, 4:10] = 3
        ref[rng.random(ref.shape) < 0.03] = 2
        save(ref, aff, tmp_path / "ref" / f"{case}.nii.gz")
        refs[case] = ref
    for case in ("a", "b"):
        save(np.roll(refs[case], 1, axis=0), aff, tmp_path / "pred" / f"{case}.nii.gz")
    return tmp_path, refs, aff


def test_skip_missing_scores_only_the_cases_with_a_prediction(three_refs, capsys):
    from flare23.cli import main

    root, refs, _ = three_refs
    default = evaluate_folders(root / "pred", root / "ref", root / "all", progress=False)
    main(["evaluate", str(root / "pred"), str(root / "ref"), "--out", str(root / "present"), "--skip_missing"])
    capsys.readouterr()
    present = json.loads((root / "present" / "summary.json").read_text())
    rows_all, rows_present = read_rows(root / "all" / "per_case.csv"), read_rows(root / "present" / "per_case.csv")
    assert sorted(rows_all) == ["a", "b", "c"] and sorted(rows_present) == ["a", "b"]
    assert default["n_cases"] == 3 and default["missing"] == ["c"] and default["not_scored"] == []
    assert present["n_cases"] == 2 and present["missing"] == [] and present["not_scored"] == ["c"]
    assert present["skip_missing"] is True and default["skip_missing"] is False
    for case in ("a", "b"):
        assert np.array_equal(rows_present[case], rows_all[case])
        assert rows_all[case][0, 0] == pytest.approx(dice(refs[case] == 1, np.roll(refs[case], 1, axis=0) == 1), abs=1e-12)
    assert np.all(rows_all["c"][[0, 1, 2], 0] == 0.0)  # the default scores the missing case as empty
    liver = np.mean([rows_present[c][0, 0] for c in ("a", "b")])
    assert present["per_class"]["liver"]["dsc"] == pytest.approx(liver, abs=1e-12)
    assert default["per_class"]["liver"]["dsc"] == pytest.approx(2 * liver / 3, abs=1e-12)
    (root / "nothing").mkdir()
    with pytest.raises(Flare23Error, match="no prediction for any reference"):
        evaluate_folders(root / "nothing", root / "ref", root / "none", progress=False, skip_missing=True)


def test_a_failing_case_leaves_earlier_outputs_untouched(three_refs):
    root, refs, aff = three_refs
    out = root / "out"
    evaluate_folders(root / "pred", root / "ref", out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shifted = aff.copy()
    shifted[:3, 3] += 2.0
    save(np.roll(refs["b"], 1, axis=0), shifted, root / "pred" / "b.nii.gz")
    for workers in (1, 2):
        with pytest.raises(Flare23Error, match=r"case b: prediction \(.*b\.nii\.gz\) grid \[shape \(24, 22, 16\)"):
            evaluate_folders(root / "pred", root / "ref", out, progress=False, workers=workers)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    resampled = evaluate_folders(root / "pred", root / "ref", root / "out2", progress=False, resample="nearest")
    assert resampled["resampled"] == ["b"]


def test_cli_help_documents_the_options():
    from flare23.evaluation.evaluate import evaluate_cli

    doc = evaluate_cli.__doc__
    assert "resample:" in doc and "skip_missing:" in doc and "nearest" in doc
