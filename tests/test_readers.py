"""Input readers: listing cases and reading NIfTI and DICOM series with the right geometry."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from flare23.data.dicom import read_dicom_series
from flare23.data.readers import Case, list_cases, read_case
from flare23.errors import Flare23Error
from flare23.io import save_nifti

LIVER = 1


def _one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in {msg!r}"


@pytest.fixture(scope="module")
def dicom_read(real_dicom_dir):
    return read_case(Case("dicom", real_dicom_dir / "dicom", "dicom"))


@pytest.fixture()
def small_series(real_dicom_dir, tmp_path) -> Path:
    """Seven consecutive slices of the real series, copied under meaningless names."""
    files = sorted((real_dicom_dir / "dicom").iterdir())[5:12]
    out = tmp_path / "series"
    out.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, out / f"img{(7 * i) % 10}_{i}")  # name order unrelated to position
    return out


def _edit(path: Path, **tags):
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)


# --- DICOM geometry on the real series -----------------------------------------------------------
def test_dicom_geometry_matches_reference_label(dicom_read, real_dicom_dir):
    array, affine, meta = dicom_read
    label = nib.load(str(real_dicom_dir / "label_flare.nii.gz"))
    assert array.shape == label.shape == (512, 512, 20)
    np.testing.assert_allclose(affine, label.affine, atol=1e-3)
    assert nib.aff2axcodes(affine) == ("L", "A", "S")
    assert array.dtype == np.int16
    assert meta["kind"] == "dicom" and meta["num_slices"] == 20 and meta["modality"] == "CT"
    np.testing.assert_allclose(meta["spacing"], (0.9765625, 0.9765625, 2.0), atol=1e-6)


def test_dicom_orientation_puts_liver_on_liver(dicom_read, real_dicom_dir):
    array, _, _ = dicom_read
    liver = np.asarray(nib.load(str(real_dicom_dir / "label_flare.nii.gz")).dataobj) == LIVER
    hu = array[liver].astype(float)
    assert 40 <= hu.mean() <= 200, hu.mean()
    # any wrong axis order or flip mixes the liver mask with fat, air and bone
    wrong = [array[::-1], array[:, ::-1], array[:, :, ::-1], array.transpose(1, 0, 2), array[::-1, ::-1]]
    assert all(hu.std() < w[liver].astype(float).std() / 2 for w in wrong)


def test_dicom_values_are_rescaled_pixels(dicom_read, real_dicom_dir):
    array, _, _ = dicom_read
    files = sorted((real_dicom_dir / "dicom").iterdir())
    ds = [pydicom.dcmread(f) for f in files]
    k = int(np.argmin([float(d.ImagePositionPatient[2]) for d in ds]))  # lowest slice comes first (S axis)
    d = ds[k]
    expected = d.pixel_array.astype(np.int32) * int(d.RescaleSlope) + int(d.RescaleIntercept)
    np.testing.assert_array_equal(array[:, :, 0], expected.T[:, ::-1])


# --- DICOM series assembled in tmp_path ----------------------------------------------------------
def test_slices_sorted_by_position_not_name(small_series, dicom_read):
    array, affine, meta = read_dicom_series(small_series)
    full, full_affine, _ = dicom_read
    positions = sorted(float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in small_series.iterdir())
    k = int(round((positions[0] - full_affine[2, 3]) / full_affine[2, 2]))
    np.testing.assert_array_equal(array, full[:, :, k : k + 7])
    np.testing.assert_allclose(affine[:3, :3], full_affine[:3, :3], atol=1e-6)
    np.testing.assert_allclose(affine[:3, 3], nib.affines.apply_affine(full_affine, [0, 0, k]), atol=1e-4)


def test_non_integer_rescale_gives_float32(small_series):
    raw, _, _ = read_dicom_series(small_series)
    for f in small_series.iterdir():
        _edit(f, RescaleSlope="0.5", RescaleIntercept="-1000.25")
    array, _, _ = read_dicom_series(small_series)
    assert array.dtype == np.float32
    np.testing.assert_allclose(array, (raw.astype(np.float64) + 1024) * 0.5 - 1000.25, atol=1e-3)


def test_missing_slice_is_an_error(small_series):
    names = sorted(small_series.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    names[3].unlink()
    with pytest.raises(Flare23Error, match="missing slice") as excinfo:
        read_dicom_series(small_series)
    _one_line_error(excinfo, small_series)


def test_mixed_series_is_an_error(small_series):
    f = sorted(small_series.iterdir())[2]
    _edit(f, SeriesInstanceUID=pydicom.uid.generate_uid())
    with pytest.raises(Flare23Error, match="2 series") as excinfo:
        read_case(list_cases(small_series)[0])
    _one_line_error(excinfo, small_series)


def test_non_uniform_spacing_is_an_error(small_series):
    f = sorted(small_series.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))[3]
    ipp = [float(v) for v in pydicom.dcmread(f).ImagePositionPatient]
    _edit(f, ImagePositionPatient=[ipp[0], ipp[1], ipp[2] + 0.5])
    with pytest.raises(Flare23Error, match="non-uniform") as excinfo:
        read_dicom_series(small_series)
    _one_line_error(excinfo, small_series)


# --- listing cases -------------------------------------------------------------------------------
def test_list_cases_every_input_form(tmp_path, real_dicom_dir):
    data = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    nifti_dir = tmp_path / "nifti"
    nifti_dir.mkdir()
    save_nifti(data, np.diag([0.8, 0.8, 2.5, 1]), nifti_dir / "case_02_0000.nii.gz")
    save_nifti(data.astype(np.float64) / 3, np.eye(4), nifti_dir / "case_01.nii")
    (nifti_dir / "notes.txt").write_text("not an image")

    one = list_cases(nifti_dir / "case_02_0000.nii.gz")
    assert one == [Case("case_02", nifti_dir / "case_02_0000.nii.gz", "nifti")]
    assert [(c.name, c.kind) for c in list_cases(nifti_dir)] == [("case_01", "nifti"), ("case_02", "nifti")]

    series = list_cases(real_dicom_dir / "dicom")
    assert series == [Case("dicom", real_dicom_dir / "dicom", "dicom")]

    root = tmp_path / "mixed"
    (root / "patient_b").mkdir(parents=True)
    (root / "patient_a").mkdir()
    (root / "empty_sub").mkdir()
    for i, f in enumerate(sorted((real_dicom_dir / "dicom").iterdir())[:2]):
        shutil.copy(f, root / "patient_b" / f"x{i}")
        shutil.copy(f, root / "patient_a" / f"y{i}.dcm")
    shutil.copy(nifti_dir / "case_01.nii", root / "case_01.nii")
    cases = list_cases(root)
    assert [(c.name, c.kind, c.path.name) for c in cases] == [
        ("case_01", "nifti", "case_01.nii"),
        ("patient_a", "dicom", "patient_a"),
        ("patient_b", "dicom", "patient_b"),
    ]


def test_read_nifti_cases(tmp_path):
    data = np.arange(24, dtype=np.int32).reshape(2, 3, 4) * 100 - 1000
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, -20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    save_nifti(data, affine, tmp_path / "a.nii.gz")
    array, aff, meta = read_case(list_cases(tmp_path / "a.nii.gz")[0])
    assert array.dtype == np.int16
    np.testing.assert_array_equal(array, data)
    np.testing.assert_allclose(aff, affine)
    assert meta["kind"] == "nifti" and meta["header"] is not None
    np.testing.assert_allclose(meta["spacing"], (0.8, 0.8, 2.5))

    save_nifti(data * 100, affine, tmp_path / "big.nii.gz")  # beyond int16: float32, exact
    array, _, _ = read_case(list_cases(tmp_path / "big.nii.gz")[0])
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, data * 100)


def test_real_nifti_case(real_ct_dir):
    array, affine, meta = read_case(list_cases(real_ct_dir / "ct.nii.gz")[0])
    img = nib.load(str(real_ct_dir / "ct.nii.gz"))
    assert array.dtype == np.int16 and array.shape == img.shape
    np.testing.assert_array_equal(array, np.asarray(img.dataobj))
    np.testing.assert_allclose(affine, img.affine)


@pytest.mark.parametrize("what", ["missing", "empty", "text", "single_dicom", "dicom_and_nifti"])
def test_list_cases_errors(tmp_path, real_dicom_dir, what):
    first = sorted((real_dicom_dir / "dicom").iterdir())[0]
    if what == "missing":
        target = tmp_path / "nope"
    elif what == "empty":
        target = tmp_path / "empty"
        target.mkdir()
    elif what == "text":
        target = tmp_path / "scan.txt"
        target.write_text("hello")
    elif what == "single_dicom":
        target = tmp_path / "slice.dcm"
        shutil.copy(first, target)
    else:
        target = tmp_path / "both"
        target.mkdir()
        shutil.copy(first, target / "slice")
        save_nifti(np.zeros((2, 2, 2), np.int16), np.eye(4), target / "x.nii.gz")
    with pytest.raises(Flare23Error) as excinfo:
        list_cases(target)
    _one_line_error(excinfo, target)
