"""Tests of the synthetic FLARE-like phantom generator (flare23.tools.phantoms, ``flare23 phantoms``)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from flare23.constants import IMAGE_SUFFIX, LABEL_KEYS, ORGAN_IDS, PARTIAL_FIVE_ORGANS, TUMOR_ID
from flare23.errors import Flare23Error
from flare23.io import case_name, strip_nifti_suffix
from flare23.tools.phantoms.anatomy import (
    BONE_MATERIALS,
    MATERIALS,
    PARTIAL_PROPORTIONS,
    PSEUDO_ERROR_PROBS,
    PSEUDO_MISSED_FRACTION,
    PSEUDO_SMALL_ORGANS,
    SCAN_RANGES,
    TUMOR_DIAMETER_MM,
    TUMOR_FRACTION,
)
from flare23.tools.phantoms.cases import _sample_case
from flare23.tools.phantoms.generate import case_seed, generate_phantoms, make_phantom

LIVER, RKID, SPLEEN, PANC, AORTA, IVC, RADR, LADR, GB, ESO, STOM, DUOD, LKID = ORGAN_IDS
M = MATERIALS
TUMOR_DIAMETER = TUMOR_DIAMETER_MM


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.argwhere(mask).mean(axis=0))


def _load(path: Path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_any_workers_and_another_seed_differs(tmp_path):
    a = generate_phantoms(tmp_path / "a", cases=3, seed=11, size="tiny", workers=1)
    b = generate_phantoms(tmp_path / "b", cases=3, seed=11, size="tiny", workers=2)
    c = generate_phantoms(tmp_path / "c", cases=3, seed=12, size="tiny")
    names = _files(a)
    assert names == _files(b) == _files(c)
    assert len([n for n in names if n.endswith(".nii.gz")]) == 12
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in names:
        if name.endswith(".nii.gz"):
            raw = (a / name).read_bytes()
            assert raw[4:8] == b"\0\0\0\0"  # gzip mtime is zero: bytes do not depend on the clock
            assert not raw[3] & 0x08  # and no file name (the temporary name) is stored
    img_a = (a / "imagesTr" / f"phantom_0000{IMAGE_SUFFIX}.nii.gz").read_bytes()
    img_c = (c / "imagesTr" / f"phantom_0000{IMAGE_SUFFIX}.nii.gz").read_bytes()
    assert img_a != img_c
    assert gzip.decompress(img_a) != gzip.decompress(img_c)


def test_make_phantom_is_deterministic_and_orientation_only_relabels_axes():
    r1 = make_phantom(5, "tiny", orientation="RAS")
    r2 = make_phantom(5, "tiny", orientation="RAS")
    for key in ("image", "label", "partial", "pseudo", "tissue", "organs"):
        assert np.array_equal(r1[key], r2[key]), key
    assert r1["meta"] == r2["meta"]
    for code in ("LPS", "LAS"):
        o = make_phantom(5, "tiny", orientation=code)
        assert nib.aff2axcodes(o["affine"]) == tuple(code)
        # back to RAS with nibabel: the same voxels at the same world positions
        ornt = nib.orientations.io_orientation(o["affine"])
        back = nib.orientations.apply_orientation(o["image"], ornt)
        assert np.array_equal(back, r1["image"])
        assert np.allclose(o["affine"] @ nib.orientations.inv_ornt_aff(ornt, o["image"].shape), r1["affine"])
        for lab in (LIVER, SPLEEN, AORTA):
            assert np.allclose(_world_centroid(o["label"] == lab, o["affine"]), _world_centroid(r1["label"] == lab, r1["affine"]))


# --------------------------------------------------------------------------------------------
# layout, datalist, headers
# --------------------------------------------------------------------------------------------


def test_layout_datalist_and_headers(tiny_phantoms):
    from monai.data import load_decathlon_datalist

    root = Path(tiny_phantoms)
    names = [f"phantom_{i:04d}" for i in range(6)]
    assert _files(root / "imagesTr") == [f"{n}{IMAGE_SUFFIX}.nii.gz" for n in names]
    for sub in ("labelsTr", "partial", "pseudo"):
        assert _files(root / sub) == [f"{n}.nii.gz" for n in names]
    raw = json.loads((root / "datalist.json").read_text())
    assert set(raw) == {"training", "validation"}
    for entry in raw["training"] + raw["validation"]:
        assert set(entry) == {"image", "label"} and not Path(entry["image"]).is_absolute()
    train = load_decathlon_datalist(str(root / "datalist.json"), True, "training", base_dir=str(root))
    val = load_decathlon_datalist(str(root / "datalist.json"), True, "validation", base_dir=str(root))
    assert len(val) == round(0.2 * 6) and len(train) + len(val) == 6
    assert sorted(case_name(d["image"]) for d in train + val) == names
    assert sorted(strip_nifti_suffix(Path(d["label"]).name) for d in train + val) == names
    for d in train + val:
        assert Path(d["image"]).is_file() and Path(d["label"]).is_file()

    metas = {m["name"]: m for m in json.loads((root / "phantoms.json").read_text())["cases"]}
    assert sorted(metas) == names
    for name in names:
        meta = metas[name]
        img, himg = _load(root / "imagesTr" / f"{name}{IMAGE_SUFFIX}.nii.gz")
        assert himg.get_data_dtype() == np.int16 and img.dtype == np.int16
        assert list(img.shape) == meta["shape"]
        assert np.allclose(himg.header.get_zooms()[:3], meta["spacing"], atol=1e-5)
        assert np.allclose(himg.affine, meta["affine"], atol=1e-4)
        assert nib.aff2axcodes(himg.affine) == tuple(meta["orientation"])
        assert himg.header.get_xyzt_units()[0] == "mm"
        assert int(himg.header["sform_code"]) > 0 and int(himg.header["qform_code"]) > 0
        for sub in ("labelsTr", "partial", "pseudo"):
            lab, hlab = _load(root / sub / f"{name}.nii.gz")
            assert hlab.get_data_dtype() == np.uint8 and lab.shape == img.shape
            assert np.allclose(hlab.affine, himg.affine, atol=1e-6)
        assert (name in {case_name(d["image"]) for d in val}) == meta["validation"]


def test_written_files_equal_make_phantom_output(tiny_phantoms):
    root = Path(tiny_phantoms)
    meta = json.loads((root / "phantoms.json").read_text())["cases"][1]
    assert meta["seed"] == case_seed(0, 1)
    ph = make_phantom(
        meta["seed"],
        "tiny",
        tumor=bool(meta["tumors"]),
        partial_kind=meta["partial_kind"],
        pseudo_miss=meta["pseudo_missed"] is not None,
    )
    assert ph["meta"]["tumors"] == meta["tumors"]
    for sub, key in (("imagesTr", "image"), ("labelsTr", "label"), ("partial", "partial"), ("pseudo", "pseudo")):
        path = root / sub / (f"{meta['name']}{IMAGE_SUFFIX}.nii.gz" if sub == "imagesTr" else f"{meta['name']}.nii.gz")
        data, img = _load(path)
        assert np.array_equal(data, ph[key]), sub
        assert np.allclose(img.affine, ph["affine"], atol=1e-6)


# --------------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "LAS"])
def test_organs_present_and_in_their_place_in_patient_coordinates(orientation):
    for seed in range(4):
        ph = make_phantom(100 + seed, "tiny", orientation=orientation)
        lab, org, aff, tis = ph["label"], ph["organs"], ph["affine"], ph["tissue"]
        assert nib.aff2axcodes(aff) == tuple(orientation)
        present = set(np.unique(lab).tolist())
        assert set(ORGAN_IDS) <= present
        assert (TUMOR_ID in present) == bool(ph["meta"]["tumors"])
        # the clean organ map equals the full label outside tumors
        assert np.array_equal(org[lab != TUMOR_ID], lab[lab != TUMOR_ID])
        c = {i: _world_centroid(org == i, aff) for i in ORGAN_IDS}
        body = _world_centroid((tis != M["air"]) & (tis != M["table"]), aff)
        spine = _world_centroid(tis == M["cancellous_bone"], aff)  # vertebral bodies (no other cancellous bone here)
        x, y, z = 0, 1, 2  # world RAS+: +x patient right, +y anterior, +z superior
        assert c[LIVER][x] > body[x] > c[SPLEEN][x]
        assert c[LIVER][x] > c[SPLEEN][x] and c[LIVER][x] > c[STOM][x]
        assert c[STOM][x] < body[x] and c[STOM][y] > c[SPLEEN][y]
        assert c[RKID][x] > spine[x] > c[LKID][x]
        assert max(c[RKID][y], c[LKID][y]) < min(c[PANC][y], c[AORTA][y], c[LIVER][y])
        assert c[AORTA][x] < spine[x] and c[AORTA][y] > spine[y]  # aorta left-anterior of the spine
        assert c[IVC][x] > c[AORTA][x]  # IVC to its right
        assert c[RADR][z] > c[RKID][z] and c[LADR][z] > c[LKID][z]  # adrenals on top of the kidneys
        assert c[RADR][x] > spine[x] > c[LADR][x]
        assert c[GB][z] < c[LIVER][z] and c[GB][x] > spine[x]  # gallbladder under the (right) liver
        assert c[ESO][z] > c[PANC][z] and c[ESO][z] > c[STOM][z]
        assert c[LIVER][z] > c[RKID][z] and c[SPLEEN][z] > c[LKID][z]
        assert c[DUOD][x] > c[PANC][x]  # C-loop around the pancreatic head, right of the body/tail
        # pancreas crosses the midline: it has voxels on both sides of the spine
        xs = nib.affines.apply_affine(aff, np.argwhere(org == PANC))[:, x]
        assert xs.min() < spine[x] < xs.max()


def test_every_organ_present_in_small_and_full_sizes():
    for seed in (1, 2):
        ph = make_phantom(seed, "small")
        assert set(ORGAN_IDS) <= set(np.unique(ph["label"]).tolist())
        counts = np.bincount(ph["label"].ravel(), minlength=15)
        assert ph["meta"]["label_voxels"] == {LABEL_KEYS[i]: int(counts[i]) for i in range(1, 15)}
    # full size: 512 x 512, realistic spacings (8 slices only, to stay fast)
    ph = make_phantom(4, "full", slices=8)
    m = ph["meta"]
    assert ph["image"].shape[:2] == (512, 512) and ph["image"].shape[2] == 8 and ph["image"].dtype == np.int16
    assert 0.6 <= m["spacing"][0] == m["spacing"][1] <= 1.0 and 0.8 <= m["spacing"][2] <= 5.0
    assert m["pad_value"] in (-1024, -2048, -3024)
    corner = ph["image"][0, 0, :]
    assert np.all(corner == m["pad_value"])  # outside the reconstruction circle


def test_geometry_varies_like_flare():
    full = [_sample_case(s, "full") for s in range(120)]
    inplane = np.array([c["spacing"][0] for c in full])
    thick = np.array([c["spacing"][2] for c in full])
    assert inplane.min() >= 0.6 and inplane.max() <= 1.0 and inplane.max() - inplane.min() > 0.3
    assert thick.min() >= 0.8 and thick.max() <= 5.0 and len(set(thick.round(2))) >= 5
    assert {c["orientation"] for c in full} == {"RAS", "LPS", "LAS"}
    assert {c["scan_range"] for c in full} == set(SCAN_RANGES)
    assert all(c["shape_ras"][:2] == (512, 512) for c in full)
    # the number of slices follows the scan range and the slice spacing
    for c in full:
        lo, hi = c["canonical_z"]
        assert abs((c["shape_ras"][2] - 1) * c["spacing"][2] - (hi - lo) * c["scale"][2]) <= c["spacing"][2] + 1e-6
    assert _sample_case(3, "full", slices=300)["shape_ras"][2] == 300
    small = [_sample_case(s, "small") for s in range(40)]
    assert all(c["shape_ras"][:2] == (128, 128) and 40 <= c["shape_ras"][2] <= 80 for c in small)
    assert all(2.5 <= c["spacing"][0] <= 3.2 and 2.5 <= c["spacing"][2] <= 5.0 for c in small)
    tiny = [_sample_case(s, "tiny") for s in range(40)]
    assert all(c["shape_ras"] == (64, 64, 32) and 4.0 <= c["spacing"][0] <= 7.0 for c in tiny)


# --------------------------------------------------------------------------------------------
# tumors and Hounsfield units
# --------------------------------------------------------------------------------------------


def test_tumors_lie_inside_their_host_organ():
    cube = np.ones((3, 3, 3), bool)
    seen_hosts = set()
    for seed, size in [(s, "tiny") for s in range(6)] + [(0, "small"), (7, "small")]:
        ph = make_phantom(seed, size, tumor=True)
        tumors = ph["meta"]["tumors"]
        assert tumors, seed
        lab, org, img = ph["label"], ph["organs"], ph["image"]
        tumor = lab == TUMOR_ID
        assert tumor.sum() == sum(t["voxels"] for t in tumors)
        hosts = {t["host"] for t in tumors}
        assert hosts <= {LIVER, RKID, LKID, PANC, STOM}
        seen_hosts |= hosts
        # each tumor voxel's 26-neighbourhood is host organ in the clean anatomy
        inner = np.zeros_like(tumor)
        for h in hosts:
            inner |= ndimage.binary_erosion(org == h, structure=cube)
        assert np.all(inner[tumor])
        # the host at every tumor centre is the declared one
        for t in tumors:
            assert TUMOR_DIAMETER[0] <= t["diameter_mm"] <= TUMOR_DIAMETER[1]
            assert org[tuple(t["center_voxel"])] == t["host"] and lab[tuple(t["center_voxel"])] == TUMOR_ID
            assert np.allclose(nib.affines.apply_affine(ph["affine"], t["center_voxel"]), t["center_mm"], atol=1e-3)
        # equivalent diameters from voxel counts stay within the declared range
        vox = float(np.prod(ph["meta"]["spacing"]))
        comps, n = ndimage.label(tumor, structure=cube)
        sizes = np.bincount(comps.ravel())[1:]
        assert (6 * sizes.max() * vox / np.pi) ** (1 / 3) <= 1.25 * TUMOR_DIAMETER[1]
        # hypo- / hyper-dense: a large single tumor is darker / brighter than its host
        if size == "small" and len(tumors) == 1 and tumors[0]["voxels"] >= 40:
            t = tumors[0]
            host = ndimage.binary_erosion(lab == t["host"], structure=cube) & (ph["tissue"] != M["gas"])
            core = ndimage.binary_erosion(tumor)
            diff = float(np.median(img[core])) - float(np.median(img[host]))
            assert np.sign(diff) == (-1 if t["kind"] == "hypo" else 1) and abs(diff) >= 10
    assert len(seen_hosts) >= 3
    assert not (make_phantom(3, "tiny", tumor=False)["label"] == TUMOR_ID).any()


def _median_eroded(img, mask):
    inner = ndimage.binary_erosion(mask)
    assert inner.sum() >= 5
    return float(np.median(img[inner]))


@pytest.mark.parametrize("phase", ["portal", "arterial"])
def test_hounsfield_ranges_per_tissue(phase):
    seed = next(s for s in range(50) if _sample_case(s, "small")["phase"] == phase)
    ph = make_phantom(seed, "small")
    img, tis, lab = ph["image"].astype(float), ph["tissue"], ph["label"]
    assert ph["meta"]["phase"] == phase
    liver = _median_eroded(img, (tis == M["liver"]) & (lab == LIVER))
    assert 40 <= liver <= 130
    assert _median_eroded(img, lab == AORTA) > 150
    assert -120 <= _median_eroded(img, tis == M["fat"]) <= -60
    assert -120 <= _median_eroded(img, tis == M["visceral_fat"]) <= -60
    assert _median_eroded(img, tis == M["gas"]) < -800
    assert _median_eroded(img, np.isin(tis, BONE_MATERIALS)) > 300
    assert 0 <= _median_eroded(img, lab == GB) <= 30
    assert 30 <= _median_eroded(img, tis == M["muscle"]) <= 70
    assert _median_eroded(img, tis == M["air"]) < -950
    # stomach holds both gas and fluid
    stomach = lab == STOM
    assert (stomach & (tis == M["gas"])).sum() > 0 and (stomach & (tis == M["gastric_fluid"])).sum() > 0
    # contrast: vessels brighter than liver, arterial phase has a brighter aorta than the IVC
    aorta, ivc = _median_eroded(img, lab == AORTA), _median_eroded(img, lab == IVC)
    assert aorta > liver and (aorta > ivc + 50 if phase == "arterial" else ivc > liver - 40)
    # noise: the image is not piecewise constant, and partial-volume blur leaves intermediate values
    inner = ndimage.binary_erosion(tis == M["liver"], iterations=2)
    assert 3.0 < float(np.std(img[inner])) < 60.0
    gas, fluid = tis == M["gas"], tis == M["gastric_fluid"]
    touching = fluid & ndimage.binary_dilation(gas)
    away = fluid & ~ndimage.binary_dilation(gas, iterations=3)
    assert touching.sum() >= 5 and away.sum() >= 5
    assert float(np.mean(img[touching])) < float(np.median(img[away])) - 30.0


# --------------------------------------------------------------------------------------------
# partial and pseudo labels, proportions
# --------------------------------------------------------------------------------------------


def test_partial_and_pseudo_labels_in_the_stated_proportions(tmp_path):
    n = 40
    root = generate_phantoms(tmp_path / "ds", cases=n, seed=3, size="tiny")
    metas = json.loads((root / "phantoms.json").read_text())["cases"]
    kinds = [m["partial_kind"] for m in metas]
    for kind, p in PARTIAL_PROPORTIONS.items():
        assert abs(kinds.count(kind) - p * n) <= 1, kind
    assert sum(bool(m["tumors"]) for m in metas) == round(TUMOR_FRACTION * n)
    assert all(m["tumors"] for m in metas if m["partial_kind"] == "tumor")  # tumor-only annotations have a tumor
    assert sum(m["pseudo_missed"] is not None for m in metas) == round(PSEUDO_MISSED_FRACTION * n)
    assert sum(m["validation"] for m in metas) == round(0.2 * n)
    errors = {"none": 0, "erode": 0, "dilate": 0}
    for m in metas:
        name = m["name"]
        lab, _ = _load(root / "labelsTr" / f"{name}.nii.gz")
        partial, _ = _load(root / "partial" / f"{name}.nii.gz")
        pseudo, _ = _load(root / "pseudo" / f"{name}.nii.gz")
        keep = {"all": list(ORGAN_IDS) + [TUMOR_ID], "five": list(PARTIAL_FIVE_ORGANS) + [TUMOR_ID], "tumor": [TUMOR_ID]}[
            m["partial_kind"]
        ]
        assert np.array_equal(partial, np.where(np.isin(lab, keep), lab, 0))
        assert (partial == TUMOR_ID).sum() == (lab == TUMOR_ID).sum()  # tumor kept wherever the case has one
        # pseudo labels: organs only, tumors relabelled as an organ
        tumor = lab == TUMOR_ID
        assert not (pseudo == TUMOR_ID).any()
        assert np.all(pseudo[tumor] > 0)
        for lab_id in ORGAN_IDS:
            err = m["pseudo_errors"][LABEL_KEYS[lab_id]]
            ref = (lab == lab_id) & ~tumor
            got = (pseudo == lab_id) & ~tumor
            if err == "missed":
                assert lab_id in PSEUDO_SMALL_ORGANS and not (pseudo == lab_id).any()
                assert m["pseudo_missed"] == LABEL_KEYS[lab_id]
                continue
            errors[err] += 1
            if err == "none":
                assert np.array_equal(got, ref)
            elif err == "erode":
                assert got.sum() < ref.sum() and not np.any(got & ~ref)
            else:
                assert got.sum() > ref.sum() and np.all(got[ref])
    total = sum(errors.values())
    for err, p in PSEUDO_ERROR_PROBS.items():
        assert abs(errors[err] / total - p) < 0.1, (err, errors)


# --------------------------------------------------------------------------------------------
# command line and errors
# --------------------------------------------------------------------------------------------


def test_cli_writes_dataset_and_reports(tmp_path, capsys):
    from flare23.cli import main

    out = tmp_path / "cli"
    main(["phantoms", str(out), "--cases", "2", "--seed", "4", "--size", "tiny"])
    printed = capsys.readouterr().out
    assert str(out) in printed and "datalist" in printed
    data = json.loads((out / "datalist.json").read_text())
    assert len(data["training"]) + len(data["validation"]) == 2 and len(data["validation"]) == 1
    assert (out / "imagesTr" / f"phantom_0001{IMAGE_SUFFIX}.nii.gz").is_file()
    assert not list(out.rglob(".*tmp*"))  # no temporary files left


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    from flare23.cli import main

    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["phantoms", str(afile), "--cases", "1", "--size", "tiny"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert str(afile) in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["phantoms", str(tmp_path / "o"), "--size", "huge"])
    assert "size" in capsys.readouterr().err
    for kwargs in ({"cases": 0}, {"tumor_fraction": 1.5}, {"validation_fraction": -0.1}, {"workers": 0}, {"slices": 1}):
        with pytest.raises(Flare23Error) as e:
            generate_phantoms(tmp_path / "bad", **{"size": "tiny", **kwargs})
        assert len(str(e.value).splitlines()) == 1 and next(iter(kwargs)) in str(e.value)
    with pytest.raises(Flare23Error, match="orientation"):
        make_phantom(0, "tiny", orientation="RPI")
    with pytest.raises(Flare23Error, match="partial_kind"):
        make_phantom(0, "tiny", partial_kind="some")
    assert not (tmp_path / "bad" / "imagesTr").exists() or not list((tmp_path / "bad" / "imagesTr").iterdir())
