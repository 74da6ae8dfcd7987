"""Tests of the FLARE data tools (flare23.data): each result is compared with an independent,
simpler computation on hand-built arrays, and every tool runs on the real CT example."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine

from flare23.constants import ORGAN_IDS, TUMOR_ID
from flare23.data.boxes import mask_box, spacing_margin_voxels
from flare23.data.crop import crop_cli, roi_labels_cli
from flare23.data.datalists import datalist_cli, split_cases
from flare23.data.fingerprint import case_rng, fingerprint_cli, intensity_fingerprint, sample_foreground
from flare23.data.labels import bbox_with_margin, bbox_with_physical_margins, merge_labels, merge_labels_cli, tumor_inside_organs
from flare23.errors import Flare23Error
from flare23.io import read_fingerprint
from flare23.roi.geometry import roi_labels

# --- helpers ---------------------------------------------------------------------------------------


def _write(path: Path, data, affine=None) -> Path:
    """Write a NIfTI with nibabel directly (independent of flare23.io)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def _read(path: Path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _oblique_affine(spacing=(0.8, 1.2, 3.0), angle_deg=30.0, origin=(-50.0, 20.0, 7.5)) -> np.ndarray:
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing) @ np.diag([-1.0, 1.0, 1.0])  # a flip too
    affine[:3, 3] = origin
    return affine


@pytest.fixture
def cli(monkeypatch):
    """``flare23.cli.main``; if modules of other commands are not there yet, only the data tools are mapped."""
    from flare23 import cli as cli_module

    try:
        cli_module._commands()
    except ImportError:
        commands = {
            "merge-labels": merge_labels_cli,
            "roi-labels": roi_labels_cli,
            "crop": crop_cli,
            "fingerprint": fingerprint_cli,
            "datalist": datalist_cli,
        }
        monkeypatch.setattr(cli_module, "_commands", lambda: commands)
    return cli_module.main


@pytest.fixture(scope="module")
def real_folder(real_ct_dir, tmp_path_factory) -> Path:
    """A FLARE-style folder with the real CT: imagesTr/real_0000.nii.gz + labelsTr/real.nii.gz."""
    root = tmp_path_factory.mktemp("real_flare")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    shutil.copy(real_ct_dir / "ct.nii.gz", root / "imagesTr" / "real_0000.nii.gz")
    shutil.copy(real_ct_dir / "label_flare.nii.gz", root / "labelsTr" / "real.nii.gz")
    return root


# --- merge-labels ----------------------------------------------------------------------------------


def test_merge_labels_follows_the_rule_voxel_by_voxel():
    rng = np.random.default_rng(0)
    shape = (7, 6, 5)
    partial = np.where(rng.random(shape) < 0.4, rng.integers(1, 15, shape), 0)
    pseudo = rng.integers(0, 15, shape)  # includes pseudo tumor (14), which must be dropped
    merged, counts = merge_labels(partial, pseudo, return_counts=True)
    expected = np.zeros(shape, dtype=int)
    n_partial = n_pseudo = 0
    for idx in np.ndindex(shape):
        if partial[idx] > 0:
            expected[idx] = partial[idx]
            n_partial += 1
        elif 1 <= pseudo[idx] <= 13:
            expected[idx] = pseudo[idx]
            n_pseudo += 1
    assert merged.dtype == np.uint8
    np.testing.assert_array_equal(merged, expected)
    assert counts == {"from_partial": n_partial, "from_pseudo": n_pseudo, "background": merged.size - n_partial - n_pseudo}
    assert np.array_equal(merged == TUMOR_ID, partial == TUMOR_ID)  # tumor only from the partial label
    with pytest.raises(ValueError):
        merge_labels(partial, pseudo[:-1])


def test_merge_labels_on_real_ct(real_folder, tmp_path, capsys, cli):
    label, affine = _read(real_folder / "labelsTr" / "real.nii.gz")
    partial = np.where(np.isin(label, (1, 2, 13)), label, 0).astype(np.uint8)  # liver + kidneys only
    centre = np.round(np.argwhere(label == 1).mean(axis=0)).astype(int)
    partial[tuple(slice(c - 2, c + 3) for c in centre)] = TUMOR_ID  # a tumor inside the liver
    pseudo = np.roll(label, 2, axis=2).astype(np.uint8)  # a shifted (imperfect) organ map
    pseudo[:10, :10, :10] = TUMOR_ID  # pseudo tumor: dropped
    _write(tmp_path / "partial" / "real.nii.gz", partial, affine)
    _write(tmp_path / "pseudo" / "real.nii.gz", pseudo, affine)
    _write(tmp_path / "pseudo" / "unlabelled.nii.gz", pseudo, affine)  # pseudo without partial: ignored
    before = _hashes(tmp_path)

    cli(["merge-labels", str(tmp_path / "partial"), str(tmp_path / "pseudo"), str(tmp_path / "out")])

    merged, out_affine = _read(tmp_path / "out" / "real.nii.gz")
    expected = np.zeros_like(label)
    for k in ORGAN_IDS:  # pseudo organs first, then every annotated partial value on top
        expected[pseudo == k] = k
    for k in range(1, 15):
        expected[partial == k] = k
    np.testing.assert_array_equal(merged, expected)
    np.testing.assert_allclose(out_affine, affine)
    assert merged.dtype == np.uint8
    n_partial = int((partial > 0).sum())
    n_pseudo = int(((partial == 0) & (pseudo >= 1) & (pseudo <= 13)).sum())
    out = capsys.readouterr().out
    assert f"real: {n_partial} voxels from partial, {n_pseudo} from pseudo, {label.size - n_partial - n_pseudo} background" in out
    assert _files(tmp_path / "out") == ["real.nii.gz"]
    assert _hashes(tmp_path / "partial") == {k[len("partial/") :]: v for k, v in before.items() if k.startswith("partial/")}
    assert {k: v for k, v in _hashes(tmp_path).items() if not k.startswith("out/")} == before


def test_merge_labels_parallel_equals_serial(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for i in range(3):
        _write(
            tmp_path / "partial" / f"c{i}.nii.gz",
            np.where(rng.random((6, 5, 4)) < 0.3, rng.integers(1, 15, (6, 5, 4)), 0).astype(np.uint8),
        )
        _write(tmp_path / "pseudo" / f"c{i}.nii.gz", rng.integers(0, 14, (6, 5, 4)).astype(np.uint8))
    merge_labels_cli(str(tmp_path / "partial"), str(tmp_path / "pseudo"), str(tmp_path / "serial"))
    merge_labels_cli(str(tmp_path / "partial"), str(tmp_path / "pseudo"), str(tmp_path / "parallel"), workers=2)
    for i in range(3):
        a, _ = _read(tmp_path / "serial" / f"c{i}.nii.gz")
        b, _ = _read(tmp_path / "parallel" / f"c{i}.nii.gz")
        p, _ = _read(tmp_path / "partial" / f"c{i}.nii.gz")
        q, _ = _read(tmp_path / "pseudo" / f"c{i}.nii.gz")
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, np.where(p > 0, p, q))  # pseudo has no tumor here


# --- roi-labels ------------------------------------------------------------------------------------


def test_roi_labels_hand_built_and_real(real_folder, tmp_path, cli):
    label = np.arange(16 * 3).reshape(4, 4, 3) % 15
    roi = roi_labels(label).numpy()
    expected = np.array([1 if 1 <= v <= 13 else 0 for v in label.ravel()]).reshape(label.shape)
    assert roi.dtype == np.uint8
    np.testing.assert_array_equal(roi, expected)

    before = _hashes(real_folder)
    cli(["roi-labels", str(real_folder / "labelsTr"), str(tmp_path / "roi")])
    real, affine = _read(real_folder / "labelsTr" / "real.nii.gz")
    out, out_affine = _read(tmp_path / "roi" / "real.nii.gz")
    np.testing.assert_array_equal(out, sum((real == k).astype(np.uint8) for k in range(1, 14)))
    np.testing.assert_allclose(out_affine, affine)
    assert _hashes(real_folder) == before


# --- crop ------------------------------------------------------------------------------------------


def _expected_box(mask, spacing, margin_mm):
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    out = []
    for axis in range(mask.ndim):
        m = math.ceil(round(margin_mm / spacing[axis], 6))
        out.append(slice(max(0, int(lo[axis]) - m), min(mask.shape[axis], int(hi[axis]) + 1 + m)))
    return tuple(out)


def test_bbox_with_margin_against_argwhere():
    rng = np.random.default_rng(2)
    spacing = (0.8, 1.2, 3.0)
    for _ in range(20):
        mask = np.zeros((30, 25, 12), dtype=bool)
        lo = rng.integers(0, (28, 23, 10))
        hi = lo + rng.integers(1, 8, 3)
        mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = rng.random(tuple(np.minimum(hi, mask.shape) - lo)) < 0.5
        if not mask.any():
            continue
        for margin in (0.0, 2.4, 5.0, 10.0):  # 2.4 mm is exactly 3 voxels at 0.8 mm and 2 at 1.2 mm
            assert bbox_with_margin(mask, spacing, margin) == _expected_box(mask, spacing, margin)
    assert bbox_with_margin(np.zeros((4, 4, 4)), spacing, 5.0) is None
    assert spacing_margin_voxels(spacing, 2.4) == (3, 2, 1)


def test_mask_box_against_argwhere():
    rng = np.random.default_rng(5)
    for shape in [(30, 25, 12), (9, 7), (40,), (1, 1, 1)]:
        for _ in range(15):
            mask = rng.random(shape) < rng.choice([0.0, 0.001, 0.05, 0.6])
            values = mask * rng.integers(1, 15, shape)  # a label map: nonzero counts, whatever the label
            idx = np.argwhere(mask)
            expected = None if idx.size == 0 else tuple(slice(int(a), int(b) + 1) for a, b in zip(idx.min(0), idx.max(0)))
            assert mask_box(mask) == expected
            assert mask_box(values) == expected


def test_bbox_with_physical_margins_against_argwhere():
    from flare23.roi.box import physical_margin_voxels as physical

    rng = np.random.default_rng(6)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-like in-plane flips: "feet" is still the lower z
    margins, above = {"feet": 10.0, "head": 5.0, "inplane": 3.0}, {"feet": 0.0, "head": 12.5, "inplane": 1.6}
    for _ in range(20):
        mask = rng.random((30, 25, 12)) < rng.choice([0.0, 0.002, 0.3])
        idx = np.argwhere(mask)
        got = bbox_with_physical_margins(mask, affine, margins, above)
        if idx.size == 0:
            assert got is None
            continue
        lo = idx.min(0) - physical(affine, margins)[0]
        hi = idx.max(0) + 1 + physical(affine, above)[1]
        assert got == tuple(slice(int(max(0, a)), int(min(n, b))) for a, b, n in zip(lo, hi, mask.shape))


def test_tumor_inside_organs_selection():
    label = np.zeros((20, 20, 20), dtype=np.uint8)
    label[2:15, 3:16, 4:17] = 1
    assert tumor_inside_organs(label)  # no tumor: kept
    label[5:8, 5:8, 5:8] = TUMOR_ID
    assert tumor_inside_organs(label)
    label[14:17, 5:8, 5:8] = TUMOR_ID  # sticks out of the organ box along axis 0
    assert not tumor_inside_organs(label)
    assert not tumor_inside_organs(np.where(label == TUMOR_ID, label, 0))  # tumor without organ


def test_crop_cli_hand_built_oblique(tmp_path, capsys):
    rng = np.random.default_rng(3)
    affine = _oblique_affine()
    spacing = (0.8, 1.2, 3.0)
    shape = (40, 30, 16)
    cases = {}
    # "inside": tumor within the organ box; "outside": tumor beyond it; "border": labels touch the edge
    for name, tumor_at in (("inside", (12, 12, 6)), ("outside", (33, 12, 6)), ("border", None)):
        image = rng.integers(-1000, 1000, shape).astype(np.int16)
        label = np.zeros(shape, dtype=np.uint8)
        if name == "border":
            label[0:5, 20:30, 10:16] = 3
        else:
            label[8:25, 6:20, 3:10] = 1
            label[20:26, 15:22, 5:9] = 11
        if tumor_at is not None:
            label[tuple(slice(t, t + 3) for t in tumor_at)] = TUMOR_ID
        _write(tmp_path / "in" / "imagesTr" / f"{name}_0000.nii.gz", image, affine)
        _write(tmp_path / "in" / "labelsTr" / f"{name}.nii.gz", label, affine)
        cases[name] = (image, label)
    _write(tmp_path / "in" / "imagesTr" / "empty_0000.nii.gz", np.zeros(shape, np.int16), affine)
    _write(tmp_path / "in" / "labelsTr" / "empty.nii.gz", np.zeros(shape, np.uint8), affine)
    before = _hashes(tmp_path / "in")

    crop_cli(
        str(tmp_path / "in" / "imagesTr"), str(tmp_path / "in" / "labelsTr"), str(tmp_path / "all"), model="organ", margin_mm=4.0
    )
    out = capsys.readouterr().out
    assert "cropped 3 of 4 cases" in out and "empty (no labelled voxel)" in out
    for name, (image, label) in cases.items():
        box = _expected_box(label > 0, spacing, 4.0)
        got_image, got_affine = _read(tmp_path / "all" / "imagesTr" / f"{name}_0000.nii.gz")
        got_label, label_affine = _read(tmp_path / "all" / "labelsTr" / f"{name}.nii.gz")
        np.testing.assert_array_equal(got_image, image[box])
        np.testing.assert_array_equal(got_label, label[box])
        assert got_image.dtype == np.int16 and got_label.dtype == np.uint8
        # the affine nibabel's own slicer gives, and world positions of corners preserved
        reference = nib.Nifti1Image(image, affine).slicer[box].affine
        np.testing.assert_allclose(got_affine, reference, atol=1e-5)
        np.testing.assert_allclose(label_affine, reference, atol=1e-5)
        start = np.array([s.start for s in box])
        for corner in ([0, 0, 0], np.array(got_image.shape) - 1):
            np.testing.assert_allclose(apply_affine(got_affine, corner), apply_affine(affine, start + corner), atol=1e-4)
    assert not (tmp_path / "all" / "imagesTr" / "empty_0000.nii.gz").exists()

    crop_cli(
        str(tmp_path / "in" / "imagesTr"),
        str(tmp_path / "in" / "labelsTr"),
        str(tmp_path / "sel"),
        model="tumor",
        margin_mm=4.0,
    )
    out = capsys.readouterr().out
    assert "outside (tumor bounding box not inside the organ bounding box)" in out
    assert _files(tmp_path / "sel") == [
        "datalist.json",
        "imagesTr/border_0000.nii.gz",
        "imagesTr/inside_0000.nii.gz",
        "labelsTr/border.nii.gz",
        "labelsTr/inside.nii.gz",
    ]
    for folder, names in (("all", {"border", "inside", "outside"}), ("sel", {"border", "inside"})):
        listed = json.loads((tmp_path / folder / "datalist.json").read_text())
        items = listed["training"] + listed["validation"]
        assert {Path(i["label"]).name for i in items} == {f"{n}.nii.gz" for n in names}
        assert all((tmp_path / folder / i["image"]).is_file() and (tmp_path / folder / i["label"]).is_file() for i in items)
    assert _hashes(tmp_path / "in") == before


def test_crop_on_real_ct(real_folder, tmp_path, cli):
    before = _hashes(real_folder)
    cli(["crop", str(real_folder / "imagesTr"), str(real_folder / "labelsTr"), str(tmp_path / "crop"), "--model", "organ",
         "--margin_mm", "10"])  # fmt: skip
    image, affine = _read(real_folder / "imagesTr" / "real_0000.nii.gz")
    label, _ = _read(real_folder / "labelsTr" / "real.nii.gz")
    box = _expected_box(label > 0, (3.0, 3.0, 3.0), 10.0)  # 10 mm at 3 mm -> 4 voxels
    got_image, got_affine = _read(tmp_path / "crop" / "imagesTr" / "real_0000.nii.gz")
    got_label, _ = _read(tmp_path / "crop" / "labelsTr" / "real.nii.gz")
    np.testing.assert_array_equal(got_image, image[box])
    np.testing.assert_array_equal(got_label, label[box])
    np.testing.assert_allclose(
        got_affine, nib.load(str(real_folder / "imagesTr" / "real_0000.nii.gz")).slicer[box].affine, atol=1e-4
    )
    assert got_image.shape < image.shape and (got_label > 0).sum() == (label > 0).sum()
    assert _hashes(real_folder) == before


def _cases_in(folder: Path) -> dict[str, set[str]]:
    """Cases of a crop output: in imagesTr, in labelsTr and in datalist.json (training + validation)."""
    listed = json.loads((folder / "datalist.json").read_text())
    items = listed["training"] + listed["validation"]
    return {
        "imagesTr": {p.name[: -len("_0000.nii.gz")] for p in (folder / "imagesTr").glob("*.nii.gz")},
        "labelsTr": {p.name[: -len(".nii.gz")] for p in (folder / "labelsTr").glob("*.nii.gz")},
        "datalist": {Path(i["label"]).name[: -len(".nii.gz")] for i in items},
        "datalist images": {Path(i["image"]).name[: -len("_0000.nii.gz")] for i in items},
    }


def test_crop_model_tumor_drops_a_tumor_outside_the_organ_box(tiny_phantoms, tmp_path, capsys, cli):
    from monai.data import load_decathlon_datalist

    root = tmp_path / "in"
    shutil.copytree(tiny_phantoms / "imagesTr", root / "imagesTr")
    shutil.copytree(tiny_phantoms / "labelsTr", root / "labelsTr")
    # a small tumor blob (label 14) far from the organs of one case, beyond its organ box along axes 0 and 1
    path = root / "labelsTr" / "phantom_0000.nii.gz"
    img = nib.load(str(path))
    label = np.asarray(img.dataobj).copy()
    organs = np.argwhere(np.isin(label, ORGAN_IDS))
    lo = organs.min(0)
    assert lo[0] >= 4 and lo[1] >= 4, "the phantom's organs reach the volume's corner: choose another place"
    label[0:3, 0:3, label.shape[2] // 2 : label.shape[2] // 2 + 3] = TUMOR_ID
    path.unlink()
    nib.save(nib.Nifti1Image(label, img.affine, img.header), str(path))

    expected_kept = set()  # the selection computed independently: tumor box (argwhere) inside organ box, or no tumor
    for p in sorted((root / "labelsTr").glob("*.nii.gz")):
        lab = np.asarray(nib.load(str(p)).dataobj)
        tumor, organ = np.argwhere(lab == TUMOR_ID), np.argwhere(np.isin(lab, ORGAN_IDS))
        inside = tumor.size == 0 or bool(np.all(tumor.min(0) >= organ.min(0)) and np.all(tumor.max(0) <= organ.max(0)))
        if inside:
            expected_kept.add(p.name[: -len(".nii.gz")])
    all_cases = {p.name[: -len("_0000.nii.gz")] for p in (root / "imagesTr").glob("*.nii.gz")}
    assert len(all_cases) == 6 and expected_kept == all_cases - {"phantom_0000"}
    before = _hashes(root)

    cli(["crop", str(root / "imagesTr"), str(root / "labelsTr"), str(tmp_path / "organ"), "--model", "organ"])
    capsys.readouterr()
    cli(["crop", str(root / "imagesTr"), str(root / "labelsTr"), str(tmp_path / "tumor"), "--model", "tumor"])
    out = capsys.readouterr().out
    assert "phantom_0000: skipped (tumor bounding box not inside the organ bounding box)" in out
    assert "cropped 5 of 6 cases for the tumor model" in out

    assert all(v == all_cases for v in _cases_in(tmp_path / "organ").values())
    assert all(v == expected_kept for v in _cases_in(tmp_path / "tumor").values())
    for folder, cases in (("organ", all_cases), ("tumor", expected_kept)):
        base = tmp_path / folder
        # read as the fine bundles' train.json does: datalist = dataset_dir/datalist.json, paths relative to dataset_dir
        items = [
            item
            for key in ("training", "validation")
            for item in load_decathlon_datalist(str(base / "datalist.json"), True, key, base_dir=str(base))
        ]
        assert len(items) == len(cases) and all(Path(i["image"]).is_file() and Path(i["label"]).is_file() for i in items)
        for item in items:  # every labelled voxel is kept by the crop
            case = Path(item["label"]).name
            got = np.asarray(nib.load(item["label"]).dataobj)
            ref = np.asarray(nib.load(str(root / "labelsTr" / case)).dataobj)
            assert np.array_equal(np.bincount(got.ravel(), minlength=15)[1:], np.bincount(ref.ravel(), minlength=15)[1:])
    assert _hashes(root) == before


def test_crop_refuses_a_non_empty_output_folder(tmp_path, capsys, cli):
    root = tmp_path / "in"
    _good_dataset(root)
    before = _hashes(root)
    out = tmp_path / "out"
    cli(["crop", str(root / "imagesTr"), str(root / "labelsTr"), str(out), "--model", "organ"])
    capsys.readouterr()
    first = _hashes(out)
    assert set(first) == {
        "datalist.json",
        "imagesTr/a_0000.nii.gz",
        "imagesTr/b_0000.nii.gz",
        "labelsTr/a.nii.gz",
        "labelsTr/b.nii.gz",
    }
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("x")
    for target in (out, stray):  # an earlier crop (the other model's) or any other content
        with pytest.raises(SystemExit) as info:
            cli(["crop", str(root / "imagesTr"), str(root / "labelsTr"), str(target), "--model", "tumor"])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("flare23: error: ") and "not empty" in err, err
    assert _hashes(out) == first and _hashes(stray) == {"notes.txt": hashlib.sha256(b"x").hexdigest()}
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder is fine
    cli(["crop", str(root / "imagesTr"), str(root / "labelsTr"), str(empty), "--model", "tumor"])
    assert set(_hashes(empty)) == set(first)
    assert _hashes(root) == before


def test_crop_with_no_case_left_is_an_error(tmp_path, capsys, cli):
    root = tmp_path / "in"
    for name in ("a", "b"):  # a tumor and no organ: rejected by --model tumor
        label = np.zeros(SHAPE, np.uint8)
        label[2:4, 2:4, 2:4] = TUMOR_ID
        _write(root / "imagesTr" / f"{name}_0000.nii.gz", np.zeros(SHAPE, np.float32))
        _write(root / "labelsTr" / f"{name}.nii.gz", label)
    with pytest.raises(SystemExit) as info:
        cli(["crop", str(root / "imagesTr"), str(root / "labelsTr"), str(tmp_path / "out"), "--model", "tumor"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "no case left" in err, err
    assert _files(tmp_path / "out") == []


@pytest.mark.parametrize(
    "extra, words",
    [([], "--model is required"), (["--model", "liver"], "'liver'"), (["--model"], "expected one of organ, tumor"),
     (["--model", "organ", "--require_tumor_in_organs", "true"], "contradicts --model organ"),
     (["--model", "tumor", "--require_tumor_in_organs", "False"], "contradicts --model tumor"),
     (["--require_tumor_in_organs", "true"], "is --model tumor")],
)  # fmt: skip
def test_crop_model_is_required_and_validated(tmp_path, capsys, cli, extra, words):
    root = tmp_path / "in"
    _good_dataset(root)
    before = _hashes(root)
    with pytest.raises(SystemExit) as info:
        cli(["crop", str(root / "imagesTr"), str(root / "labelsTr"), str(tmp_path / "out"), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flare23: error: crop: --") and words in err, err
    assert not (tmp_path / "out").exists() and _hashes(root) == before
    with pytest.raises(Flare23Error, match="--model is required"):
        crop_cli(str(root / "imagesTr"), str(root / "labelsTr"), str(tmp_path / "out"))


# --- fingerprint -----------------------------------------------------------------------------------


def test_fingerprint_exact_on_constant_foregrounds(tmp_path, cli):
    # case a: a small foreground of 100; case b: a large one of 300; background values never sampled.
    # Each case gives the same number of samples, so the pooled values are half 100, half 300.
    a_img = np.full((6, 6, 6), -1000, np.int16)
    a_lbl = np.zeros((6, 6, 6), np.uint8)
    a_img[1:3, 1:3, 1:3], a_lbl[1:3, 1:3, 1:3] = 100, 1
    b_img = np.full((6, 6, 6), 2000, np.int16)
    b_lbl = np.zeros((6, 6, 6), np.uint8)
    b_img[:, :, :4], b_lbl[:, :, :4] = 300, 14
    for name, img, lbl in (("a", a_img, a_lbl), ("b", b_img, b_lbl)):
        _write(tmp_path / "imagesTr" / f"{name}_0000.nii.gz", img)
        _write(tmp_path / "labelsTr" / f"{name}.nii.gz", lbl)
    cli(["fingerprint", str(tmp_path / "imagesTr"), str(tmp_path / "labelsTr"), str(tmp_path / "fp.json"), "--samples", "1001"])
    fp = json.loads((tmp_path / "fp.json").read_text())
    pooled = np.array([100.0] * 500 + [300.0] * 500)
    assert fp["n_cases"] == 2 and fp["n_voxels"] == 1000
    for key, value in {
        "mean": 200.0,
        "std": 100.0,
        "median": 200.0,
        "min": 100.0,
        "max": 300.0,
        "clip_low": np.percentile(pooled, 0.5),
        "clip_high": np.percentile(pooled, 99.5),
    }.items():
        assert fp[key] == pytest.approx(value), key
    assert fp["percentile_00_5"] == fp["clip_low"] and fp["percentile_99_5"] == fp["clip_high"]
    assert read_fingerprint(tmp_path / "fp.json") == {k: fp[k] for k in ("clip_low", "clip_high", "mean", "std")}


def test_fingerprint_sampling_is_uniform_deterministic_and_parallel_safe(tmp_path):
    rng = np.random.default_rng(4)
    images, labels = [], []
    for i in range(3):
        img = rng.normal(50 * i, 10, (10, 10, 8)).astype(np.float32)
        lbl = (rng.random((10, 10, 8)) < 0.3).astype(np.uint8)
        images.append(img)
        labels.append(lbl)
        _write(tmp_path / "imagesTr" / f"c{i}_0000.nii.gz", img)
        _write(tmp_path / "labelsTr" / f"c{i}.nii.gz", lbl)
    # uniform with replacement: a foreground of one quarter zeros, three quarters ones -> mean 0.75
    binary = np.zeros((20, 20, 10), np.float32)
    binary[:5] = 0.0
    binary[5:] = 1.0
    fp = intensity_fingerprint([binary], [np.ones_like(binary)], samples=40_000, seed=7)
    assert fp["mean"] == pytest.approx(0.75, abs=5 * math.sqrt(0.75 * 0.25 / 40_000))
    # per-case draws come from SeedSequence(seed).spawn(n)[i]
    child = np.random.SeedSequence(9).spawn(3)[1]
    expected = np.random.default_rng(child).choice(images[1][labels[1] > 0], 100, replace=True)
    np.testing.assert_array_equal(sample_foreground(images[1], labels[1], 100, case_rng(9, 1)), expected)

    pure = intensity_fingerprint(images, labels, samples=3000, seed=9)
    assert pure == intensity_fingerprint(images, labels, samples=3000, seed=9)
    assert pure["mean"] != intensity_fingerprint(images, labels, samples=3000, seed=10)["mean"]
    for workers in (1, 2):
        out = tmp_path / f"fp{workers}.json"
        fingerprint_cli(
            str(tmp_path / "imagesTr"), str(tmp_path / "labelsTr"), str(out), samples=3000, seed=9, workers=workers
        )
        got = json.loads(out.read_text())
        assert {k: got[k] for k in pure} == pytest.approx(pure, rel=1e-6), workers


def test_fingerprint_on_real_ct(real_folder, tmp_path, cli):
    before = _hashes(real_folder)
    cli(
        [
            "fingerprint",
            str(real_folder / "imagesTr"),
            str(real_folder / "labelsTr"),
            str(tmp_path / "fp.json"),
            "--samples",
            "400000",
        ]
    )
    fp = json.loads((tmp_path / "fp.json").read_text())
    image, _ = _read(real_folder / "imagesTr" / "real_0000.nii.gz")
    label, _ = _read(real_folder / "labelsTr" / "real.nii.gz")
    fg = np.sort(image[label > 0].astype(float))
    assert fp["n_voxels"] == 400_000 and fp["min"] >= fg[0] and fp["max"] <= fg[-1]
    assert fp["mean"] == pytest.approx(fg.mean(), abs=5 * fg.std() / math.sqrt(400_000))
    assert fp["std"] == pytest.approx(fg.std(), rel=0.02)
    # the estimated percentiles sit at about the right rank of the exact foreground distribution
    rank_low = (
        np.searchsorted(fg, fp["clip_low"], side="left") / fg.size,
        np.searchsorted(fg, fp["clip_low"], side="right") / fg.size,
    )
    rank_high = (
        np.searchsorted(fg, fp["clip_high"], side="left") / fg.size,
        np.searchsorted(fg, fp["clip_high"], side="right") / fg.size,
    )
    assert rank_low[0] - 0.002 <= 0.005 <= rank_low[1] + 0.002
    assert rank_high[0] - 0.002 <= 0.995 <= rank_high[1] + 0.002
    assert _hashes(real_folder) == before


# --- datalist --------------------------------------------------------------------------------------


def test_split_cases_is_stable_and_proportional():
    cases = [f"case_{i:04d}" for i in range(300)]
    train, val = split_cases(cases, 0.2, seed=0)
    assert sorted(train + val) == sorted(cases) and not set(train) & set(val)
    assert 0.12 < len(val) / len(cases) < 0.28
    assert split_cases(list(reversed(cases)), 0.2, seed=0) == (train, val)
    more_train, more_val = split_cases(cases + [f"new_{i}" for i in range(50)], 0.2, seed=0)
    assert set(val) <= set(more_val) and set(train) <= set(more_train)  # adding cases moves none
    assert split_cases(cases, 0.2, seed=1)[1] != val
    assert split_cases(cases, 0.0)[1] == []
    for n in (2, 3):  # tiny sets keep both sides non-empty
        t, v = split_cases(cases[:n], 0.2)
        assert t and v


def test_datalist_cli_with_monai(tmp_path, cli):
    from monai.data import load_decathlon_datalist

    names = [f"case_{i}" for i in range(7)]
    for name in names:
        _write(tmp_path / "ds" / "imagesTr" / f"{name}_0000.nii.gz", np.zeros((3, 3, 3), np.int16))
        _write(tmp_path / "ds" / "labelsTr" / f"{name}.nii.gz", np.zeros((3, 3, 3), np.uint8))
    before = _hashes(tmp_path / "ds")
    cli(
        [
            "datalist",
            str(tmp_path / "ds" / "imagesTr"),
            "--labels",
            str(tmp_path / "ds" / "labelsTr"),
            "--validation_fraction",
            "0.3",
            "--seed",
            "5",
        ]
    )
    path = tmp_path / "ds" / "datalist.json"  # default: beside imagesTr
    raw = json.loads(path.read_text())
    assert raw["training"][0]["image"].startswith("imagesTr/")
    train = load_decathlon_datalist(str(path), True, "training")
    val = load_decathlon_datalist(str(path), True, "validation")
    expected_train, expected_val = split_cases(names, 0.3, seed=5)
    for items, expected in ((train, expected_train), (val, expected_val)):
        assert [Path(d["image"]).resolve() for d in items] == [
            (tmp_path / "ds" / "imagesTr" / f"{n}_0000.nii.gz").resolve() for n in expected
        ]
        assert [Path(d["label"]).resolve() for d in items] == [
            (tmp_path / "ds" / "labelsTr" / f"{n}.nii.gz").resolve() for n in expected
        ]
    assert sorted(expected_train + expected_val) == names and expected_val

    cli(["datalist", str(tmp_path / "ds" / "imagesTr"), "--out", str(tmp_path / "lists" / "test.json")])
    testing = load_decathlon_datalist(str(tmp_path / "lists" / "test.json"), False, "testing")
    assert [Path(d["image"]).resolve() for d in testing] == [
        (tmp_path / "ds" / "imagesTr" / f"{n}_0000.nii.gz").resolve() for n in names
    ]
    assert {k: v for k, v in _hashes(tmp_path / "ds").items() if k != "datalist.json"} == before


def test_datalist_on_real_ct(real_folder, tmp_path, cli):
    from monai.data import load_decathlon_datalist

    out = tmp_path / "elsewhere" / "datalist.json"
    cli(["datalist", str(real_folder / "imagesTr"), "--labels", str(real_folder / "labelsTr"), "--out", str(out)])
    train = load_decathlon_datalist(str(out), True, "training")
    assert json.loads(out.read_text())["validation"] == []  # one case: training only
    assert [Path(train[0]["image"]).resolve(), Path(train[0]["label"]).resolve()] == [
        (real_folder / "imagesTr" / "real_0000.nii.gz").resolve(),
        (real_folder / "labelsTr" / "real.nii.gz").resolve(),
    ]


# --- bad input -------------------------------------------------------------------------------------

SHAPE = (8, 9, 10)


def _good_dataset(root: Path) -> None:
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        label = np.zeros(SHAPE, np.uint8)
        label[2:6, 2:7, 3:8] = 1
        _write(root / "imagesTr" / f"{name}_0000.nii.gz", rng.normal(0, 100, SHAPE).astype(np.float32))
        _write(root / "labelsTr" / f"{name}.nii.gz", label)
        _write(root / "pseudo" / f"{name}.nii.gz", label)


def _truncate(path: Path) -> None:
    data = gzip.compress(nib.Nifti1Image(np.random.default_rng(6).normal(0, 1, SHAPE).astype(np.float32), np.eye(4)).to_bytes())
    path.write_bytes(data[: len(data) // 2])


def _bad(kind: str, root: Path) -> None:
    img, lbl = root / "imagesTr", root / "labelsTr"
    if kind == "image_without_label":
        _write(img / "c_0000.nii.gz", np.zeros(SHAPE, np.float32))
    elif kind == "partial_without_pseudo":
        _write(lbl / "c.nii.gz", np.zeros(SHAPE, np.uint8))
    elif kind == "shape":
        _write(lbl / "b.nii.gz", np.zeros((8, 9, 11), np.uint8))
    elif kind == "affine":
        shifted = np.eye(4)
        shifted[:3, 3] = 5.0
        _write(lbl / "b.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
    elif kind == "not_3d_4d":
        _write(img / "b_0000.nii.gz", np.zeros(SHAPE + (2,), np.float32))
    elif kind == "not_3d_2d":
        _write(lbl / "b.nii.gz", np.zeros(SHAPE[:2], np.uint8))
    elif kind == "unreadable":
        (img / "b_0000.nii.gz").write_bytes(b"this is not a NIfTI file" * 20)
    elif kind == "truncated":
        _truncate(img / "b_0000.nii.gz")
    elif kind == "label_values":
        _write(lbl / "b.nii.gz", np.full(SHAPE, 20, np.uint8))


# kind, command (placeholders IMG / LBL / PSEUDO / OUT), case named, words of the message, files that may exist in OUT
BAD_INPUTS = [
    ("image_without_label", ["crop", "IMG", "LBL", "OUT", "--model", "organ"], "c", "has no label", []),
    ("image_without_label", ["datalist", "IMG", "--labels", "LBL", "--out", "OUT/dl.json"], "c", "has no label", []),
    ("partial_without_pseudo", ["merge-labels", "LBL", "PSEUDO", "OUT"], "c", "has no pseudo label", []),
    ("shape", ["fingerprint", "IMG", "LBL", "OUT/fp.json"], "b", "shape", []),
    ("shape", ["crop", "IMG", "LBL", "OUT", "--model", "organ"], "b", "shape", []),
    ("affine", ["crop", "IMG", "LBL", "OUT", "--model", "organ"], "b", "affine", []),
    ("affine", ["datalist", "IMG", "--labels", "LBL", "--out", "OUT/dl.json"], "b", "affine", []),
    ("not_3d_4d", ["crop", "IMG", "LBL", "OUT", "--model", "organ"], "b", "3D", []),
    ("not_3d_2d", ["roi-labels", "LBL", "OUT"], "b", "3D", []),
    ("unreadable", ["crop", "IMG", "LBL", "OUT", "--model", "organ"], "b", "not a readable NIfTI", []),
    (
        "truncated",
        ["crop", "IMG", "LBL", "OUT", "--model", "organ"],
        "b",
        "truncated",
        ["imagesTr/a_0000.nii.gz", "labelsTr/a.nii.gz"],
    ),
    ("truncated", ["fingerprint", "IMG", "LBL", "OUT/fp.json", "--workers", "2"], "b", "truncated", []),
    ("label_values", ["merge-labels", "LBL", "PSEUDO", "OUT"], "b", "0..14", ["a.nii.gz"]),
]


@pytest.mark.parametrize("kind, command, case, words, allowed", BAD_INPUTS, ids=[f"{b[0]}-{b[1][0]}" for b in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_no_partial_output(tmp_path, capsys, cli, kind, command, case, words, allowed):
    root = tmp_path / "in"
    _good_dataset(root)
    _bad(kind, root)
    before = _hashes(root)
    out = tmp_path / "out"
    subst = {"IMG": str(root / "imagesTr"), "LBL": str(root / "labelsTr"), "PSEUDO": str(root / "pseudo"), "OUT": str(out)}
    argv = [subst.get(a, a.replace("OUT", str(out))) for a in command]
    with pytest.raises(SystemExit) as info:
        cli(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flare23: error: ")
    assert f"case {case}:" in err and words in err, err
    assert _files(out) == allowed  # no partial file, no temporary file
    for name in allowed:  # files of completed cases are complete (they read in full)
        assert np.all(np.isfinite(nib.load(str(out / name)).get_fdata()))
    assert _hashes(root) == before


def test_output_folder_not_writable(tmp_path, capsys, cli):
    root = tmp_path / "in"
    _good_dataset(root)
    before = _hashes(root)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    commands = [
        ["crop", str(root / "imagesTr"), str(root / "labelsTr"), str(blocker / "out"), "--model", "organ"],
        ["merge-labels", str(root / "labelsTr"), str(root / "pseudo"), str(blocker / "out")],
        ["roi-labels", str(root / "labelsTr"), str(blocker / "out")],
        ["fingerprint", str(root / "imagesTr"), str(root / "labelsTr"), str(blocker / "out" / "fp.json")],
        ["datalist", str(root / "imagesTr"), "--labels", str(root / "labelsTr"), "--out", str(blocker / "dl.json")],
        ["roi-labels", str(root / "labelsTr"), str(root / "labelsTr")],  # the output folder is the input folder
    ]
    for argv in commands:
        with pytest.raises(SystemExit) as info:
            cli(argv)
        assert info.value.code == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("not writable" in err or "is an input folder" in err), err
    assert blocker.read_text() == "x"
    assert _hashes(root) == before


def test_read_only_output_folder(tmp_path, capsys, cli):
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    root = tmp_path / "in"
    _good_dataset(root)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as info:
            cli(["roi-labels", str(root / "labelsTr"), str(locked)])
    finally:
        locked.chmod(0o700)
    assert info.value.code == 2 and "not writable" in capsys.readouterr().err
    assert _files(locked) == []


@pytest.mark.parametrize("z_sign", [1.0, -1.0])  # slice index towards the head (RAS) or towards the feet
def test_crop_default_keeps_the_training_context_in_physical_directions(tmp_path, z_sign):
    from flare23.constants import CONTEXT_MARGINS_MM

    shape = (60, 50, 120)
    affine = np.diag([-2.0, -2.0, 3.0 * z_sign, 1.0])
    label = np.zeros(shape, np.uint8)
    label[25:35, 20:28, 50:70] = 1
    image = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    _write(tmp_path / "in" / "imagesTr" / "c_0000.nii.gz", image, affine)
    _write(tmp_path / "in" / "labelsTr" / "c.nii.gz", label, affine)
    crop_cli(str(tmp_path / "in" / "imagesTr"), str(tmp_path / "in" / "labelsTr"), str(tmp_path / "out"), model="tumor")
    got, got_affine = _read(tmp_path / "out" / "imagesTr" / "c_0000.nii.gz")
    feet, head, inplane = (CONTEXT_MARGINS_MM[k][1] for k in ("feet", "head", "inplane"))
    xy = math.ceil(inplane / 2.0)  # 30 mm at 2 mm: 15 voxels, clamped to the volume
    below_z, above_z = (math.ceil(feet / 3.0), math.ceil(head / 3.0))[:: int(z_sign)]
    box = (slice(max(0, 25 - xy), min(60, 35 + xy)), slice(max(0, 20 - xy), min(50, 28 + xy)),
           slice(max(0, 50 - below_z), min(120, 70 + above_z)))  # fmt: skip
    np.testing.assert_array_equal(got, image[box])
    np.testing.assert_allclose(got_affine, nib.Nifti1Image(image, affine).slicer[box].affine, atol=1e-5)
    # 120 mm / 3 mm = 40 slices towards the feet, 60 mm / 3 mm = 20 towards the head, whichever way the slices run
    assert box[2] == (slice(10, 90) if z_sign > 0 else slice(30, 110))
