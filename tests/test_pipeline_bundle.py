"""The pipeline bundle end to end (random tiny networks): `monai.bundle run` and `flare23 segment`."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "bundles" / "pipeline" / "configs" / "inference.json"
TINY = {
    "roi_overrides": "{'network_def#filters': [4, 8, 8, 8, 8]}",
    "organ_overrides": "{'network_def#filters': [4, 8, 8, 8, 8, 8], 'target_spacing': [6.0, 6.0, 6.0], 'patch_size': [64, 64, 32]}",
    "tumor_overrides": "{'network_def#filters': [4, 8, 8, 8, 8, 8], 'target_spacing': [8.0, 8.0, 8.0], 'patch_size': [64, 64, 32]}",
}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _tiny_args():
    args = ["--load_pretrain", "false", "--precision", "fp32"]
    for k, v in TINY.items():
        args += [f"--{k}", v]
    return args


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from flare23.tools.phantoms.generate import make_phantom

    d = tmp_path_factory.mktemp("pipeline_in")
    for seed, orientation in ((1, "RAS"), (2, "LPS")):
        case = make_phantom(seed, size="tiny", orientation=orientation)
        nib.save(nib.Nifti1Image(case["image"], case["affine"]), str(d / f"case {seed} é_0000.nii.gz"))
    return d


def test_bundle_run_writes_one_label_map_per_case_with_the_input_geometry(inputs, tmp_path):
    before = {p.name: _sha(p) for p in inputs.iterdir()}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", str(CONFIG),
           "--bundle_root", str(ROOT / "bundles" / "pipeline"), "--dataset_dir", str(inputs), "--output_dir", str(out), *_tiny_args()]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for src in sorted(inputs.iterdir()):
        name = src.name.replace("_0000.nii.gz", ".nii.gz")
        res, ref = nib.load(str(out / name)), nib.load(str(src))
        assert res.shape == ref.shape and np.allclose(res.affine, ref.affine, atol=1e-6)
        assert res.get_data_dtype() == np.uint8
        assert int(np.asarray(res.dataobj).max()) <= 14
    rows = (out / "timings.csv").read_text().splitlines()
    assert rows[0].startswith("case,") and len(rows) == 3 and "organ_network" in rows[0]
    eff = (out / "efficiency.csv").read_text().splitlines()
    assert eff[0].split(",")[:3] == ["case", "wall_s", "peak_rss_mb"] and len(eff) == 3
    assert {p.name: _sha(p) for p in inputs.iterdir()} == before  # inputs untouched
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files


def test_segment_cli_single_file_to_file_and_bad_input(inputs, tmp_path):
    src = sorted(inputs.iterdir())[0]
    dst = tmp_path / "result.nii.gz"
    cmd = [sys.executable, "-m", "flare23", "segment", "-i", str(src), "-o", str(dst), "--device", "cpu", *_tiny_args()]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res, ref = nib.load(str(dst)), nib.load(str(src))
    assert res.shape == ref.shape and np.allclose(res.affine, ref.affine)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".flare23-")) == []

    bad = tmp_path / "broken_0000.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    r = subprocess.run([sys.executable, "-m", "flare23", "segment", "-i", str(bad), "-o", str(tmp_path / "x.nii.gz"), *_tiny_args()],
                       capture_output=True, text=True, env=_env(), timeout=300)  # fmt: skip
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("flare23: error:")]
    assert any("broken_0000.nii.gz" in ln and "not a readable NIfTI" in ln for ln in lines), r.stderr[-2000:]
    assert "1 of 1 case(s) failed" in lines[-1]
    assert ".flare23-" not in r.stderr  # no message names the temporary folder, deleted by then
    assert not (tmp_path / "x.nii.gz").exists()


def test_folder_run_continues_after_a_bad_case_and_fails_at_the_end(inputs, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted(inputs.iterdir())[0]
    (folder / good.name).write_bytes(good.read_bytes())
    (folder / "a_truncated_0000.nii.gz").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    before = {p.name: _sha(p) for p in folder.iterdir()}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "flare23", "segment", "-i", str(folder), "-o", str(out), *_tiny_args()],
                       capture_output=True, text=True, env=_env(), timeout=900)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("flare23: error:")]
    assert any("a_truncated_0000.nii.gz" in ln for ln in lines) and "1 of 2 case(s) failed" in lines[-1]
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".nii.gz")) == [good.name.replace("_0000", "")]
    assert {p.name: _sha(p) for p in folder.iterdir()} == before


def test_roi_parameters_come_from_the_roi_bundle_except_the_mirrored_pass():
    """One source of truth: the pipeline's ROI settings are the ROI bundle's, but it skips the mirrored pass."""
    from monai.bundle import ConfigParser

    from flare23.bundles import SubBundle
    from flare23.constants import ROI_MIRROR_AXES

    roi = SubBundle(ROOT / "bundles" / "roi_extractor", "inference.json", {})
    assert list(roi.get("mirror_axes")) == list(ROI_MIRROR_AXES) and len(ROI_MIRROR_AXES) == 1
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser["bundle_root"] = str(ROOT / "bundles" / "pipeline")
    params = parser.get_parsed_content("inferer#roi_params")
    assert params["mirror_axes"] == []
    for key in ("margins_mm", "max_whole_slices", "tile", "pad_multiple"):
        assert params[key] == roi.get(key), key
    parser["roi_mirror_axes"] = [0]
    parser.parse(True)
    assert parser.get_parsed_content("inferer#roi_params")["mirror_axes"] == [0]


def test_sub_bundle_overrides_take_expressions_in_the_nested_spelling_and_merge_dicts():
    """`--tumor_overrides "{'network_def': {'strides': '$...'}}"` reaches the tumor bundle merged into its network."""
    from monai.bundle import ConfigParser

    from flare23.bundles import SubBundle
    from flare23.constants import ORGAN_STRIDES_XYZ

    tumor = SubBundle(ROOT / "bundles" / "tumor_seg", "inference.json", {})
    default = tumor.parser["network_def"]
    assert [list(s) for s in default["strides"]] != [list(s) for s in ORGAN_STRIDES_XYZ]  # the override is a change
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser["bundle_root"] = str(ROOT / "bundles" / "pipeline")
    parser["tumor_overrides"] = {
        "network_def#filters": [4, 8, 8, 8, 8, 8],  # the flat spelling, literal value
        "network_def": {
            "strides": "$flare23.constants.ORGAN_STRIDES_XYZ",
            "upsample_kernel_size": "$flare23.constants.ORGAN_STRIDES_XYZ[1:]",
        },
        "overlap": 0.25,
    }
    sub = parser.get_parsed_content("tumor_config")
    net = sub.parser["network_def"]
    assert [list(s) for s in net["strides"]] == [list(s) for s in ORGAN_STRIDES_XYZ]
    assert [list(s) for s in net["upsample_kernel_size"]] == [list(s) for s in ORGAN_STRIDES_XYZ[1:]]
    assert list(net["filters"]) == [4, 8, 8, 8, 8, 8]
    for key in set(default) - {"strides", "upsample_kernel_size", "filters"}:  # the rest is the bundle's own
        assert net[key] == default[key], key
    assert sub.get("overlap") == 0.25
    built = sub.network()
    assert [list(s) for s in built.strides] == [list(s) for s in ORGAN_STRIDES_XYZ]
    # a dict with _target_ replaces the component whole
    other = SubBundle(ROOT / "bundles" / "tumor_seg", "inference.json",
                      {"network_def": {"_target_": "torch.nn.Identity"}})  # fmt: skip
    assert other.parser["network_def"] == {"_target_": "torch.nn.Identity"}


def test_the_same_scan_as_dicom_and_as_nifti_in_any_axis_order_gives_identical_labels(real_dicom_dir, tmp_path):
    """A DICOM series (read LAS), the same voxels written as NIfTI, and reoriented NIfTI copies: the same labels.

    Random (seeded) networks are enough: the labels are a function of the voxels each stage sees, and
    those must be the same voxels whatever the file's axis order (the ROI subsampling phase, the box,
    the crop's RAS grid, the model grids from spacings rounded to 1e-5 mm, the way back).
    """
    from flare23.data.readers import list_cases, read_case

    [case] = list_cases(real_dicom_dir / "dicom")
    array, affine, _ = read_case(case)
    base = nib.Nifti1Image(array, affine)
    inputs = tmp_path / "nifti"
    inputs.mkdir()
    copies = {"las": base, "ras": nib.as_closest_canonical(base),
              "psl": base.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("PSL")))}  # fmt: skip
    for name, img in copies.items():
        nib.save(img, str(inputs / f"{name}.nii.gz"))  # float32 pixdim in the header, float64 in the DICOM reader
    assert nib.aff2axcodes(copies["psl"].affine) == ("P", "S", "L")
    runs = {"dicom": (real_dicom_dir / "dicom", tmp_path / "dicom.nii.gz"), "nifti": (inputs, tmp_path / "out")}
    for src, dst in runs.values():
        r = subprocess.run([sys.executable, "-m", "flare23", "segment", "-i", str(src), "-o", str(dst), *_tiny_args()],
                           capture_output=True, text=True, env=_env(), timeout=900)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    ref = nib.load(str(tmp_path / "dicom.nii.gz"))
    ref_labels = np.asarray(ref.dataobj)
    assert np.allclose(ref.affine, affine, atol=1e-4) and len(np.unique(ref_labels)) > 1
    for name, img in copies.items():
        out = nib.load(str(tmp_path / "out" / f"{name}.nii.gz"))
        assert np.allclose(out.affine, img.affine, atol=1e-4)
        back = out.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(out.affine), nib.io_orientation(affine)))
        assert np.allclose(back.affine, affine, atol=1e-4)
        assert np.array_equal(np.asarray(back.dataobj), ref_labels), (name, float((np.asarray(back.dataobj) != ref_labels).mean()))


def test_post_processing_lists_and_fraction_are_pipeline_ids(inputs, tmp_path):
    """``keep_largest_labels`` / ``remove_small_labels`` / ``small_component_fraction`` reach the clean-up.

    The run with them equals the run without post-processing, cleaned up by hand with the same lists.
    """
    from flare23.inference.postprocess import postprocess

    src = sorted(inputs.iterdir())[0]  # the RAS phantom: the crop's C order is the file's
    assert nib.aff2axcodes(nib.load(str(src)).affine) == ("R", "A", "S")
    runs = {"raw": ["--postprocess", "false"],
            "custom": ["--keep_largest_labels", str(list(range(1, 15))), "--remove_small_labels", "[]", "--small_component_fraction", "0.5"]}  # fmt: skip
    out = {}
    for name, extra in runs.items():
        dst = tmp_path / f"{name}.nii.gz"
        r = subprocess.run([sys.executable, "-m", "flare23", "segment", "-i", str(src), "-o", str(dst), *_tiny_args(), *extra],
                           capture_output=True, text=True, env=_env(), timeout=900)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = np.asarray(nib.load(str(dst)).dataobj)
    expected = postprocess(out["raw"], keep_largest=list(range(1, 15)), remove_small=[], fraction=0.5)
    assert not np.array_equal(expected, out["raw"])  # the lists changed something here
    assert np.array_equal(out["custom"], expected)
    r = subprocess.run([sys.executable, "-m", "flare23", "segment", "-i", str(src), "-o", str(tmp_path / "bad.nii.gz"),
                        *_tiny_args(), "--small_component_fraction", "2"], capture_output=True, text=True, env=_env(), timeout=900)  # fmt: skip
    assert r.returncode == 2 and "small_component_fraction must be in [0, 1]" in r.stderr
