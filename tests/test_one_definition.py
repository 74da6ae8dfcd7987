"""One definition of each preprocessing step, used by training, each bundle's inference and the cascade.

The cascade's network input for a crop of a real CT must equal what the fine bundle's own
``inference.json`` preprocessing makes of the same crop (same resampling convention, same CT
normalisation, read from the same ids), to 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged, Orientationd

from flare23.bundles import SubBundle
from flare23.data.grids import reorient
from flare23.data.spacing import ResampleToSpacing, ResampleToSpacingd, resampled_affine, target_shape
from flare23.inference.branches import branch_from_bundle
from flare23.inference.cascade import prepare_branch_input
from flare23.io import voxel_spacing
from flare23.roi.geometry import ras_affine

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"


# --- the convention ----------------------------------------------------------------------------------------------------
def test_target_shape_rounds_like_nnunet_and_ignores_float32_noise_in_the_spacing():
    assert target_shape((512, 512, 100), (0.8, 0.8, 2.5), (1.6, 1.6, 5.0)) == (256, 256, 50)
    assert target_shape((3, 5, 7), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)) == tuple(int(v) for v in np.round([1.5, 2.5, 3.5]))
    # a NIfTI header's float32 spacing and the DICOM string of the same scan give the same shape
    f32 = float(np.float32(0.7)) / 1.0000001
    assert f32 != 0.7 and target_shape((5,), (f32,), (1.0,)) == target_shape((5,), (0.7,), (1.0,)) == (4,)
    assert round(5 * f32 / 1.0) == 3  # the naive rounding would have split them (3.4999996 vs 3.5)


def test_resampling_maps_voxel_centres_with_aligned_outer_edges_and_inverts(tmp_path):
    gen = torch.Generator().manual_seed(0)
    affine = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    img = MetaTensor(torch.rand((1, 20, 18, 9), generator=gen) * 1000 - 500, affine=torch.as_tensor(affine))
    out = ResampleToSpacing((1.6, 1.2, 2.0))(img)
    m = target_shape((20, 18, 9), voxel_spacing(affine), (1.6, 1.2, 2.0))
    assert tuple(out.shape[1:]) == m == (10, 12, 11)
    # independent: torch's align_corners=False trilinear, and world centres at (j + 0.5) * n / m - 0.5
    ref = F.interpolate(img.as_tensor()[None].float(), size=m, mode="trilinear", align_corners=False)[0]
    assert torch.allclose(out.as_tensor(), ref, atol=1e-4)
    j = np.array([3.0, 7.0, 5.0, 1.0])
    src = np.append((j[:3] + 0.5) * np.array([20, 18, 9]) / np.array(m) - 0.5, 1.0)
    assert np.allclose(out.affine.numpy() @ j, affine @ src)
    assert np.allclose(resampled_affine(affine, (20, 18, 9), m), out.affine.numpy())
    # labels: nearest-exact, dtype kept; inverse: back to the input grid and affine
    lab = MetaTensor(torch.randint(0, 5, (1, 20, 18, 9), generator=gen, dtype=torch.uint8), affine=torch.as_tensor(affine))
    down = ResampleToSpacing((1.6, 1.2, 2.0), "nearest")(lab)
    assert down.dtype == torch.uint8
    assert torch.equal(down.as_tensor(), F.interpolate(lab.as_tensor()[None].float(), size=m, mode="nearest-exact")[0].to(torch.uint8))
    xform = ResampleToSpacingd("label", (1.6, 1.2, 2.0), mode="nearest")
    back = xform.inverse(xform({"label": lab}))["label"]
    assert tuple(back.shape) == tuple(lab.shape) and np.allclose(back.affine.numpy(), affine)


def test_invertd_takes_probabilities_back_to_the_input_grid(tmp_path):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).normal(size=(30, 26, 12)).astype(np.float32), affine), str(path))
    pre = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), Orientationd("image", "RAS"),
                   ResampleToSpacingd("image", (1.6, 1.6, 3.0))])  # fmt: skip
    d = pre({"image": str(path)})
    assert tuple(d["image"].shape[1:]) == (15, 13, 10)
    d["pred"] = d["image"].repeat(3, 1, 1, 1)
    inv = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(d)
    assert tuple(inv["pred"].shape) == (3, 30, 26, 12) and np.allclose(inv["pred"].affine.numpy(), affine)


# --- the cascade against the bundles' own preprocessing --------------------------------------------------------------
@pytest.mark.parametrize("bundle, name", [("organ_seg", "organ"), ("tumor_seg", "tumor")])
def test_the_cascades_network_input_equals_the_bundles_own_preprocessing_on_a_real_ct(real_ct_dir, tmp_path, bundle, name):
    img = nib.load(str(real_ct_dir / "ct.nii.gz"))
    data = np.asarray(img.dataobj)
    box = tuple(slice(n // 6, n - n // 7) for n in data.shape)  # an off-centre crop, as the ROI box gives
    crop = data[box]
    crop_affine = img.affine.copy()
    crop_affine[:3, 3] = img.affine[:3, :3] @ np.array([s.start for s in box]) + img.affine[:3, 3]
    path = tmp_path / "crop.nii.gz"
    nib.save(nib.Nifti1Image(crop, crop_affine, header=img.header), str(path))

    sub = SubBundle(BUNDLES / bundle, "inference.json", {"load_pretrain": False})
    bundle_input = sub.get("preprocessing")({"image": str(path)})["image"]

    branch = branch_from_bundle(sub, name)
    crop_t = torch.as_tensor(np.asarray(nib.load(str(path)).dataobj))
    ras = ras_affine(crop_affine, crop_t.shape)
    crop_ras = reorient(crop_t, crop_affine, ras)
    cascade_input, _ = prepare_branch_input(branch, crop_ras, tuple(float(v) for v in voxel_spacing(ras)), torch.device("cpu"))

    assert tuple(cascade_input.shape[1:]) == tuple(bundle_input.shape)
    assert torch.allclose(cascade_input[0], bundle_input.as_tensor().float(), atol=1e-4), (cascade_input[0] - bundle_input).abs().max()
    # the grid is the one the convention names, not just the same numbers by chance
    assert np.allclose(bundle_input.affine.numpy(), resampled_affine(ras, crop_ras.shape, tuple(bundle_input.shape[1:])), atol=1e-4)


def test_the_cascade_never_normalises_the_shared_crop_in_place():
    """A float32 crop already on a branch's grid is that branch's input as it is: normalising it in place would
    hand the other branch a normalised crop (a silent wrong answer). A resampled volume is normalised in place."""
    from flare23.inference.branches import Branch
    from flare23.models.transforms import CTNormalize

    gen = torch.Generator().manual_seed(3)
    crop = (torch.rand((16, 12, 10), generator=gen) * 2000 - 1000).float()
    before = crop.clone()
    norm = {"clip_low": -900.0, "clip_high": 300.0, "mean": 50.0, "std": 150.0}
    same_grid = Branch("tumor", (2.0, 2.0, 3.0), (16, 16, 8), 0.5, **norm)
    coarser = Branch("organ", (4.0, 4.0, 6.0), (16, 16, 8), 0.5, **norm)
    a, _ = prepare_branch_input(same_grid, crop, (2.0, 2.0, 3.0), torch.device("cpu"))
    assert torch.equal(crop, before)  # the shared crop is untouched
    assert torch.allclose(a[0, 0], CTNormalize(**norm)(before))
    b, _ = prepare_branch_input(coarser, crop, (2.0, 2.0, 3.0), torch.device("cpu"))
    ref = F.interpolate(before[None, None], size=(8, 6, 5), mode="trilinear", align_corners=False)[0, 0]
    assert torch.allclose(b[0, 0], CTNormalize(**norm)(ref), atol=1e-5)
    # the in-place form gives the same numbers and writes into the tensor it is given
    t = before.clone()
    out = CTNormalize(**norm, inplace=True)(t)
    assert out.data_ptr() == t.data_ptr() and torch.allclose(out, CTNormalize(**norm)(before))
