"""The bundles' image loader: a missing, empty or unreadable image is one line naming it (never the working folder)."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImaged

from flare23.data.loading import LoadCaseImaged
from flare23.errors import CaseError


def test_a_good_image_loads_as_monai_loads_it(tmp_path):
    path = tmp_path / "c_0000.nii.gz"
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))
    ours = LoadCaseImaged(keys="image", ensure_channel_first=True)({"image": str(path)})["image"]
    monai = LoadImaged(keys="image", ensure_channel_first=True)({"image": str(path)})["image"]
    assert np.array_equal(np.asarray(ours), np.asarray(monai)) and np.allclose(ours.affine, monai.affine)
    assert isinstance(LoadCaseImaged(keys="image"), LoadImaged)  # MONAI Label configures it as the bundle's loader


def test_an_empty_path_is_refused_and_the_working_folder_never_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MONAI's LoadImaged would read this folder as a DICOM series
    with pytest.raises(CaseError, match="no input image: the path of 'image' is empty"):
        LoadCaseImaged(keys="image")({"image": ""})


@pytest.mark.parametrize("kind", ["missing", "truncated", "not_an_image"])
def test_a_missing_or_unreadable_file_is_one_line_naming_it(tmp_path, kind):
    path = tmp_path / "case_0000.nii.gz"
    if kind == "truncated":
        noise = np.random.default_rng(0).integers(-1000, 1000, (20, 20, 20), dtype=np.int16)
        nib.save(nib.Nifti1Image(noise, np.eye(4)), str(path))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "not_an_image":
        path.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    with pytest.raises(CaseError) as info:
        LoadCaseImaged(keys="image")({"image": str(path)})
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert ("no such file" in message) == (kind == "missing")
