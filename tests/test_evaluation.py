"""``flare23 evaluate`` over folders (flare23.evaluation.evaluate), checked against an independent loop."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import surface_distance as sd
from scipy import ndimage

from flare23.constants import FOREGROUND_IDS, NSD_TOLERANCE_MM, ORGAN_IDS, SLAB_RESTRICTED_IDS
from flare23.errors import Flare23Error
from flare23.evaluation.evaluate import evaluate_folders

pytestmark = pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")  # surface-distance's scipy aliases

# the column contract of the issue, written out independently of flare23.constants
NAMES = [
    "liver", "right_kidney", "spleen", "pancreas", "aorta", "inferior_vena_cava", "right_adrenal_gland",
    "left_adrenal_gland", "gallbladder", "esophagus", "stomach", "duodenum", "left_kidney", "tumor",
]  # fmt: skip
COLUMNS = ["case"] + [f"{n}_{m}" for n in NAMES for m in ("dsc", "nsd")]


def flare_reference(ref, pred, spacing, cutoff=0.1):
    """The organisers' per-class loop on top of surface-distance (independent of flare23.evaluation.metrics)."""
    out = {}
    for c in FOREGROUND_IDS:
        g, p = ref == c, pred == c
        if not g.any() and not p.any():
            out[c] = (1.0, 1.0)
        elif not g.any() or not p.any():
            out[c] = (0.0, 0.0)
        else:
            if c in SLAB_RESTRICTED_IDS:
                z = np.where(g)[2]
                g, p = g[:, :, z.min() : z.max()], p[:, :, z.min() : z.max()]
            d = sd.compute_dice_coefficient(g, p)
            n = (
                0.0
                if d < cutoff
                else sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(g, p, spacing), NSD_TOLERANCE_MM[c])
            )
            out[c] = (float(d), float(n))
    return out


def label_pair(rng, shape):
    fields = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 2.5) for _ in range(15)])
    ref = fields.argmax(0).astype(np.uint8)
    pred = ref.copy()
    pred = np.where(ref == 4, np.roll(ref, 1, axis=1), pred)
    flip = rng.random(shape) < 0.05
    pred[flip] = rng.integers(0, 15, int(flip.sum()))
    pred[pred == 8] = 0
    ref[ref == 14] = 0
    return ref, pred


def save(arr, affine, path):
    img = nib.Nifti1Image(arr, affine)
    img.set_data_dtype(arr.dtype)
    nib.save(img, str(path))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("eval")
    ref_dir, pred_dir = root / "ref", root / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    truth = {}
    # case_a: RAS, anisotropic; case_b: flipped and permuted axes (LPS-like), saved as .nii; case_c: no prediction
    aff_a = np.diag([0.8, 0.9, 2.5, 1.0])
    aff_b = np.array([[0, -1.2, 0, 10], [-0.7, 0, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]], float)
    for name, shape, affine, suffix in [("case_a", (30, 26, 20), aff_a, ".nii.gz"), ("case_b", (24, 28, 18), aff_b, ".nii")]:
        ref, pred = label_pair(rng, shape)
        save(ref, affine, ref_dir / f"{name}.nii.gz")
        save(pred.astype(np.int16), affine, pred_dir / f"{name}{suffix}")
        spacing = nib.load(str(ref_dir / f"{name}.nii.gz")).header.get_zooms()[:3]
        truth[name] = flare_reference(ref, pred, spacing)
    ref_c, _ = label_pair(rng, (20, 20, 12))
    save(ref_c, aff_a, ref_dir / "case_c.nii.gz")
    truth["case_c"] = {c: ((0.0, 0.0) if (ref_c == c).any() else (1.0, 1.0)) for c in FOREGROUND_IDS}
    save(np.zeros((5, 5, 5), np.uint8), aff_a, pred_dir / "case_x.nii.gz")  # prediction without reference
    return ref_dir, pred_dir, truth


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_evaluate_folders_matches_independent_loop(folders, tmp_path):
    ref_dir, pred_dir, truth = folders
    before = digest(ref_dir), digest(pred_dir)
    out = tmp_path / "out"
    summary = evaluate_folders(pred_dir, ref_dir, out, progress=False)
    assert (digest(ref_dir), digest(pred_dir)) == before  # inputs untouched
    assert sorted(p.name for p in out.iterdir()) == ["lesions.csv", "per_case.csv", "summary.json"]  # no temporary files left

    header, rows = read_csv(out / "per_case.csv")
    assert header == COLUMNS
    assert [r[0] for r in rows] == ["case_a", "case_b", "case_c"]
    table = np.array([[float(v) for v in r[1:]] for r in rows]).reshape(3, 14, 2)
    for i, case in enumerate(["case_a", "case_b", "case_c"]):
        expected = np.array([truth[case][c] for c in FOREGROUND_IDS])
        assert np.allclose(table[i], expected, atol=1e-6), case
    assert 0.05 < table[0, 0, 1] < 1.0 and table[0, 7, 0] == 0.0  # a real NSD; left adrenal removed from the prediction

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    class_means = table.mean(axis=0)
    organ = [FOREGROUND_IDS.index(c) for c in ORGAN_IDS]
    assert on_disk["organ_dsc"] == pytest.approx(class_means[organ, 0].mean(), abs=1e-9)
    assert on_disk["organ_nsd"] == pytest.approx(class_means[organ, 1].mean(), abs=1e-9)
    assert on_disk["tumor_dsc"] == pytest.approx(class_means[13, 0], abs=1e-9)
    assert on_disk["tumor_nsd"] == pytest.approx(class_means[13, 1], abs=1e-9)
    assert list(on_disk["per_class"]) == NAMES
    assert on_disk["per_class"]["duodenum"]["dsc"] == pytest.approx(class_means[11, 0], abs=1e-9)
    assert on_disk["missing"] == ["case_c"] and on_disk["n_cases"] == 3
    assert on_disk["unmatched_predictions"] == ["case_x"]


def test_parallel_workers_and_cutoff(folders, tmp_path):
    ref_dir, pred_dir, _ = folders
    evaluate_folders(pred_dir, ref_dir, tmp_path / "one", progress=False)
    evaluate_folders(pred_dir, ref_dir, tmp_path / "two", workers=2, progress=False)
    assert (tmp_path / "one" / "per_case.csv").read_text() == (tmp_path / "two" / "per_case.csv").read_text()
    strict = evaluate_folders(pred_dir, ref_dir, tmp_path / "strict", nsd_cutoff=1.0, progress=False)
    _, rows = read_csv(tmp_path / "strict" / "per_case.csv")
    for r in rows:
        values = np.array([float(v) for v in r[1:]]).reshape(14, 2)
        assert np.all((values[:, 1] == 0) | (values[:, 0] == 1.0))  # NSD survives only where DSC == 1
    assert strict["nsd_cutoff"] == 1.0


def test_shape_mismatch_names_the_case(folders, tmp_path):
    ref_dir, _, _ = folders
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    save(np.zeros((30, 26, 21), np.uint8), np.eye(4), pred_dir / "case_a.nii.gz")
    with pytest.raises(Flare23Error, match=r"case_a.*shape \(30, 26, 21\).*\(30, 26, 20\)"):
        evaluate_folders(pred_dir, ref_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "per_case.csv").exists()


def test_bad_inputs(folders, tmp_path):
    ref_dir, pred_dir, _ = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Flare23Error, match="no NIfTI reference"):
        evaluate_folders(pred_dir, empty, tmp_path / "o", progress=False)
    with pytest.raises(Flare23Error, match="not a folder"):
        evaluate_folders(tmp_path / "nope", ref_dir, tmp_path / "o", progress=False)
    with pytest.raises(Flare23Error, match="workers"):
        evaluate_folders(pred_dir, ref_dir, tmp_path / "o", workers=0, progress=False)
    with pytest.raises(Flare23Error, match="nsd_cutoff"):
        evaluate_folders(pred_dir, ref_dir, tmp_path / "o", nsd_cutoff=2, progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "case_a.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(Flare23Error, match="case_a.nii.gz"):
        evaluate_folders(broken, ref_dir, tmp_path / "o", progress=False)


def test_cli(folders, tmp_path, capsys):
    from flare23.cli import main

    ref_dir, pred_dir, _ = folders
    main(["evaluate", str(pred_dir), str(ref_dir), "--out", str(tmp_path / "cli"), "--nsd_cutoff", "0.2"])
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["nsd_cutoff"] == 0.2
    assert f"{summary['organ_dsc']:.4f}" in printed and "case_c" in printed
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tmp_path / "missing"), str(ref_dir), "--out", str(tmp_path / "cli2")])
    assert exc.value.code == 2
    assert "flare23: error:" in capsys.readouterr().err


def test_real_ct_reference(real_ct_dir, tmp_path):
    """A real TotalSegmentator label map against a perturbed copy of itself (header spacing 3 mm)."""
    ref_img = nib.load(str(real_ct_dir / "label_flare.nii.gz"))
    ref = np.asarray(ref_img.dataobj).astype(np.uint8)
    pred = np.roll(ref, 1, axis=0)
    pred[pred == 7] = 0
    pred[ndimage.binary_dilation(ref == 1, iterations=2) & (pred == 0)] = 1
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    save(ref, ref_img.affine, tmp_path / "ref" / "ts.nii.gz")
    save(pred, ref_img.affine, tmp_path / "pred" / "ts.nii.gz")
    evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", progress=False)
    _, rows = read_csv(tmp_path / "out" / "per_case.csv")
    got = np.array([float(v) for v in rows[0][1:]]).reshape(14, 2)
    expected = flare_reference(ref, pred, ref_img.header.get_zooms()[:3])
    assert np.allclose(got, [expected[c] for c in FOREGROUND_IDS], atol=1e-6)
    assert 0.5 < got[0, 0] < 1.0 and got[6, 0] == 0.0 and got[9, 0] == 1.0  # liver, right adrenal removed, esophagus absent
