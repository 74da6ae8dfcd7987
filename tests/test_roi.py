"""ROI extractor: strides, subsampling, normalisation, labels, the light U-Net, tiled inference, the box, transforms."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, Orientationd
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from flare23.constants import (
    ORGAN_IDS,
    ROI_CLIP,
    ROI_ENCODER_DEPTHS,
    ROI_MARGIN_FEET_MM,
    ROI_MARGIN_HEAD_MM,
    ROI_MARGIN_INPLANE_MM,
    ROI_STRIDES,
    TUMOR_ID,
)
from flare23.data.grids import reorient
from flare23.errors import Flare23Error
from flare23.io import load_nifti
from flare23.models.networks import ROI_FILTERS, LightUNet, count_parameters, fold_batchnorm
from flare23.roi.box import RoiBox, _as_ints, locate, physical_margin_voxels, roi_box, upsample_mask
from flare23.roi.coverage import BoxCoverage, box_coverage
from flare23.roi.geometry import (
    META_FULL_SHAPE,
    META_OFFSETS,
    META_STRIDES,
    _numpy,
    ras_affine,
    ras_phase,
    roi_labels,
    roi_strides,
    slice_axis,
    slice_stride,
    subsample,
    subsampled_affine,
    subsampled_shape,
)
from flare23.roi.predict import RoiInferer, normalise_roi, roi_logits, roi_predict
from flare23.roi.transforms import RoiBoxd, RoiLabel, RoiNormalized, RoiRestored, RoiSaveMaskd, RoiSubsampled

torch.set_num_threads(1)
MARGINS = {"feet": ROI_MARGIN_FEET_MM, "head": ROI_MARGIN_HEAD_MM, "inplane": ROI_MARGIN_INPLANE_MM}


# --- helpers --------------------------------------------------------------------------------------
def reoriented(arr: np.ndarray, affine: np.ndarray, axcodes: str):
    """The same physical image in another array orientation (nibabel, independent of flare23.roi)."""
    start = nib.orientations.io_orientation(affine)
    t = ornt_transform(start, axcodes2ornt(axcodes))
    return apply_orientation(arr, t), affine @ inv_ornt_aff(t, arr.shape)


def rotation_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def make_affine(spacing, rot=np.eye(3), origin=(10.0, -20.0, 30.0)):
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def bbox(mask: np.ndarray):
    idx = np.argwhere(mask)
    return idx.min(0), idx.max(0) + 1


class ThresholdNet(torch.nn.Module):
    """Logits (0, x - t): 'foreground' where the input exceeds t; records the input shapes it saw."""

    def __init__(self, t: float = 0.0):
        super().__init__()
        self.t = t
        self.w = torch.nn.Parameter(torch.zeros(1))  # so that next(parameters()) gives a device
        self.shapes: list[tuple] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return torch.cat([torch.zeros_like(x), x - self.t], dim=1)


# --- strides and subsampling ----------------------------------------------------------------------
@pytest.mark.parametrize("spacing", [0.5, 0.8, 1.0, 1.25, 2.0, 2.5, 3.0, 4.9, 5.0, 7.5, 12.0])
def test_slice_stride_is_rounded_ratio(spacing):
    expected = max(1, round(5.0 / spacing))
    assert slice_stride(spacing) == expected
    assert slice_stride(spacing) * spacing == pytest.approx(5.0, abs=spacing / 2 + 1e-9) or expected == 1


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_slice_stride_rejects_bad_spacing(bad):
    with pytest.raises(Flare23Error, match="slice spacing"):
        slice_stride(bad)


def test_strides_follow_the_axis_most_aligned_with_head_feet():
    assert roi_strides(make_affine((0.8, 0.8, 2.5))) == (4, 4, 2)
    assert roi_strides(make_affine((0.7, 0.7, 1.0))) == (4, 4, 5)
    # slices on array axis 0 (the S-I axis), in-plane axes 1 and 2
    a = np.zeros((4, 4))
    a[2, 0], a[0, 1], a[1, 2], a[3, 3] = -1.25, 0.9, 0.9, 1
    assert slice_axis(a) == 0
    assert roi_strides(a) == (4, 4, 4)
    # oblique: 25 degrees about R-L keeps axis 2 as the slice axis; 70 degrees makes it axis 1
    assert slice_axis(make_affine((1, 1, 3), rotation_x(25))) == 2
    assert slice_axis(make_affine((1, 1, 3), rotation_x(70))) == 1
    assert roi_strides(make_affine((1, 1, 3), rotation_x(70))) == (4, 5, 4)


def test_subsample_is_a_view_with_every_kth_voxel():
    x = np.arange(30 * 21 * 10, dtype=np.int16).reshape(30, 21, 10)
    s = subsample(x, (4, 4, 3))
    assert np.shares_memory(s, x)
    expected = x[np.ix_(np.arange(0, 30, 4), np.arange(0, 21, 4), np.arange(0, 10, 3))]
    np.testing.assert_array_equal(s, expected)
    assert s.shape == subsampled_shape(x.shape, (4, 4, 3)) == (8, 6, 4)
    t = torch.from_numpy(x.astype(np.float32))
    st = subsample(t[None], (4, 4, 3))
    assert st.data_ptr() == t.data_ptr() and torch.equal(st[0], torch.from_numpy(expected.astype(np.float32)))


def test_normalise_clips_then_zscores_without_touching_the_input():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3000, 3000, (20, 18, 7)).astype(np.int16)
    before = x.copy()
    out = normalise_roi(x)
    c = np.clip(x.astype(np.float64), *ROI_CLIP)
    expected = (c - c.mean()) / c.std()
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)
    np.testing.assert_array_equal(x, before)
    t = torch.from_numpy(x.astype(np.float32))
    t0 = t.clone()
    normalise_roi(t)
    assert torch.equal(t, t0)
    assert torch.all(normalise_roi(np.full((4, 4, 4), 50.0)) == 0)  # constant volume: no division by zero


def test_roi_labels_organs_to_one_tumor_and_background_to_zero():
    lab = torch.arange(0, 15).repeat(2)
    out = roi_labels(lab)
    expected = torch.tensor([1 if v in ORGAN_IDS else 0 for v in lab.tolist()], dtype=torch.uint8)
    assert out.dtype == torch.uint8 and torch.equal(out, expected)
    assert int(roi_labels(torch.tensor([TUMOR_ID]))[0]) == 0
    with pytest.raises(Flare23Error, match=r"case_7.nii.gz: label values must be in 0..14"):
        RoiLabel()(MetaTensor(torch.tensor([[0, 15]]), meta={"filename_or_obj": "/d/case_7.nii.gz"}))
    with pytest.raises(Flare23Error, match="non-integer"):
        roi_labels(torch.tensor([0.5]))


# --- network --------------------------------------------------------------------------------------
def _expected_parameters(filters, depths, cin=1, cout=2):
    conv = lambda a, b: 27 * a * b + 2 * b  # noqa: E731  3x3x3 conv without bias + batch norm (gamma, beta)
    n = conv(cin, filters[0])  # initial layer
    prev = filters[0]
    for f, d in zip(filters, depths):
        n += conv(prev, f) + (d - 1) * conv(f, f)
        prev = f
    for i in range(len(filters) - 1):
        n += 8 * filters[i + 1] * filters[i] + filters[i]  # transposed conv 2x2x2 with bias
        n += conv(2 * filters[i], filters[i]) + conv(filters[i], filters[i])
    return n + filters[0] * cout + cout


def test_light_unet_structure_and_parameter_count():
    net = LightUNet()
    assert count_parameters(net) == _expected_parameters(ROI_FILTERS, ROI_ENCODER_DEPTHS)
    assert 10.0e6 < count_parameters(net) < 11.5e6  # paper: 10.66 M
    assert [sum(isinstance(m, torch.nn.Conv3d) for m in stage.modules()) for stage in net.encoder] == list(ROI_ENCODER_DEPTHS)
    assert [stage[0].conv.stride[0] for stage in net.encoder] == list(ROI_STRIDES)
    assert len(net.decoder) == 4 and all(isinstance(u.conv, torch.nn.ConvTranspose3d) for u in net.upsamples)
    small = LightUNet(filters=(4, 8, 8, 8, 8))
    assert count_parameters(small) == _expected_parameters((4, 8, 8, 8, 8), ROI_ENCODER_DEPTHS)
    assert small(torch.randn(1, 1, 32, 16, 16)).shape == (1, 2, 32, 16, 16)
    with pytest.raises(Flare23Error, match="same length"):
        LightUNet(filters=(4, 8, 16))


def test_fold_batchnorm_matches_in_eval_mode():
    torch.manual_seed(0)
    net = LightUNet(filters=(6, 8, 12, 16, 16))
    net.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            net(torch.randn(2, 1, 32, 32, 16) * 3 + 1)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    net.eval()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules()) > 20  # the original is untouched
    x = torch.randn(1, 1, 48, 32, 16)
    with torch.no_grad():
        a, b = net(x), folded(x)
    assert torch.allclose(a, b, atol=1e-4, rtol=0), float((a - b).abs().max())
    plain = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3), torch.nn.BatchNorm3d(3), torch.nn.ReLU()).eval()
    plain[1].running_mean.fill_(0.7)
    plain[1].running_var.fill_(2.0)
    fp = fold_batchnorm(plain)
    assert isinstance(fp[1], torch.nn.Identity)
    with torch.no_grad():
        assert torch.allclose(plain(x), fp(x), atol=1e-5)


# --- inference: whole volume or tiles -------------------------------------------------------------
def test_whole_volume_is_padded_to_16_and_cropped_back():
    net = ThresholdNet(0.2)
    x = torch.randn(1, 1, 21, 19, 37)
    out = roi_logits(net, x, max_whole_slices=240)
    assert net.shapes == [(1, 1, 32, 32, 48)]
    assert torch.equal(out[:, 1:], x - 0.2)
    pred = roi_predict(net, x)
    assert pred.dtype == torch.uint8 and pred.shape == (1, 1, 21, 19, 37)
    assert torch.equal(pred.bool(), x > 0.2)


def test_many_slices_use_non_overlapping_tiles():
    net = ThresholdNet(-0.1)
    x = torch.randn(1, 1, 45, 30, 100)
    tile = (20, 16, 40)
    out = roi_logits(net, x, max_whole_slices=99, tile=tile, pad_multiple=8)
    n_tiles = [math.ceil(n / t) for n, t in zip(x.shape[2:], tile)]
    assert len(net.shapes) == int(np.prod(n_tiles))  # 3 * 2 * 3
    for s in net.shapes:  # tiles at most the tile size, rounded up to the pad multiple
        assert all(n % 8 == 0 and n <= -(-t // 8) * 8 for n, t in zip(s[2:], tile))
    assert torch.equal(out[:, 1:], x + 0.1)  # every voxel written once, in the right place
    net.shapes.clear()
    roi_logits(net, x, max_whole_slices=100, tile=tile, pad_multiple=8)
    assert len(net.shapes) == 1  # 100 slices <= 100: whole volume


class RampNet(ThresholdNet):
    """Logits (0, x + i / 10) with i the index along spatial dim ``dim``: not mirror-symmetric."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        n = x.shape[2 + self.dim]
        ramp = (torch.arange(n, dtype=x.dtype) / 10).view([n if d == 2 + self.dim else 1 for d in range(5)])
        return torch.cat([torch.zeros_like(x), x + ramp], dim=1)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_mirrored_passes_average_the_probabilities(dim):
    x = torch.randn(1, 1, 13, 11, 9)
    n = x.shape[2 + dim]
    i = torch.arange(n, dtype=x.dtype).view([n if d == 2 + dim else 1 for d in range(5)])
    plain = torch.sigmoid(x + i / 10)
    mirrored = torch.sigmoid(x + (n - 1 - i) / 10)  # the pass on the mirrored volume, mirrored back
    for axes, expected in [((), plain), ((dim,), (plain + mirrored) / 2)]:
        net = RampNet(dim)
        out = roi_logits(net, x, pad_multiple=1, mirror_axes=axes)
        assert len(net.shapes) == 1 + len(axes)
        torch.testing.assert_close(torch.softmax(out, 1)[:, 1:], expected, atol=1e-6, rtol=1e-6)
    # mirroring along another axis does not change a ramp along ``dim``; three passes are averaged as well
    other = [d for d in range(3) if d != dim]
    out = roi_logits(RampNet(dim), x, pad_multiple=1, mirror_axes=[dim, *other])
    torch.testing.assert_close(torch.softmax(out, 1)[:, 1:], (plain * 3 + mirrored) / 4, atol=1e-6, rtol=1e-6)
    pred = roi_predict(RampNet(dim), x, pad_multiple=1, mirror_axes=[dim])
    assert torch.equal(pred.bool(), (plain + mirrored) / 2 > 0.5)
    # the same through the MONAI inferer and through locate's parameters
    inferred = RoiInferer(pad_multiple=1, mirror_axes=[dim])(x, RampNet(dim))
    torch.testing.assert_close(inferred, roi_logits(RampNet(dim), x, pad_multiple=1, mirror_axes=[dim]))
    for bad in ([3], [0, 0], [-1]):
        with pytest.raises(Flare23Error, match="mirror_axes"):
            RoiInferer(mirror_axes=bad)


def test_roi_inferer_keeps_meta_data():
    x = MetaTensor(torch.randn(1, 1, 16, 16, 8), affine=torch.diag(torch.tensor([3.0, 3.0, 5.0, 1.0])))
    out = RoiInferer()(x, ThresholdNet())
    assert isinstance(out, MetaTensor) and out.shape == (1, 2, 16, 16, 8)
    assert torch.equal(out.affine, x.affine)


# --- the box --------------------------------------------------------------------------------------
def test_box_axis_aligned_ras_known_answer():
    shape, spacing = (60, 50, 70), (1.5, 2.0, 2.5)
    m = np.zeros(shape, np.uint8)
    m[20:31, 15:26, 30:41] = 1
    box = roi_box(m, (1, 1, 1), shape, make_affine(spacing))
    inplane = [math.ceil(ROI_MARGIN_INPLANE_MM / s) for s in spacing[:2]]
    assert box.start == (20 - inplane[0], 15 - inplane[1], 30 - math.ceil(ROI_MARGIN_FEET_MM / 2.5))
    assert box.stop == (31 + inplane[0], 26 + inplane[1], 41 + math.ceil(ROI_MARGIN_HEAD_MM / 2.5))
    # z flipped (LPS-like): the feet are at the high-index end now
    flipped = make_affine(spacing, np.diag([-1.0, -1.0, -1.0]))
    box = roi_box(m, (1, 1, 1), shape, flipped)
    assert box.start[2] == 30 - math.ceil(ROI_MARGIN_HEAD_MM / 2.5) and box.stop[2] == 41 + math.ceil(ROI_MARGIN_FEET_MM / 2.5)
    # clamped to the image; custom margins
    m2 = np.zeros(shape, np.uint8)
    m2[0:3, 45:50, 2:5] = 1
    box = roi_box(m2, (1, 1, 1), shape, make_affine(spacing), {"feet": 0, "head": 10, "inplane": 3})
    assert box.start == (0, 45 - 2, 2) and box.stop == (3 + 2, 50, 5 + 4)
    assert box.slices == (slice(0, 5), slice(43, 50), slice(2, 9))


@pytest.mark.parametrize("axcodes", ["LPS", "LAS", "RAI", "SAR", "PSL", "ILA"])
def test_box_is_the_same_physical_region_in_every_orientation(axcodes):
    shape, spacing = (40, 36, 30), (2.0, 2.5, 4.0)
    rng = np.random.default_rng(3)
    m = np.zeros(shape, np.uint8)
    m[12:25, 8:20, 10:19] = 1
    m[rng.integers(10, 28), rng.integers(5, 25), rng.integers(5, 25)] = 1
    aff = make_affine(spacing)
    ref = roi_box(m, (1, 1, 1), shape, aff).to_json(aff)
    m2, aff2 = reoriented(m, aff, axcodes)
    box2 = roi_box(m2, (1, 1, 1), m2.shape, aff2)
    got = box2.to_json(aff2)
    np.testing.assert_allclose(got["min_mm"], ref["min_mm"], atol=1e-6)
    np.testing.assert_allclose(got["max_mm"], ref["max_mm"], atol=1e-6)
    # and with the ROI strides of that orientation, the box still covers the mask
    strides = roi_strides(aff2, inplane=2, target_mm=8.0)
    sub = subsample(m2, strides)
    box3 = roi_box(sub, strides, m2.shape, aff2)
    lo, hi = bbox(m2 * (np.indices(m2.shape) % np.array(strides)[:, None, None, None] == 0).all(0))
    assert all(a <= b for a, b in zip(box3.start, lo)) and all(a >= b for a, b in zip(box3.stop, hi))


def _assert_margins_respected(mask, affine, box, margins, samples=7):
    """Every foreground voxel moved by any displacement in the physical margin region stays in the box."""
    inv = np.linalg.inv(affine[:3, :3])
    inplane = np.linspace(-margins["inplane"], margins["inplane"], samples)
    grid = [inplane, inplane, np.linspace(-margins["feet"], margins["head"], samples)]
    disp = np.array(list(itertools.product(*grid))) @ inv.T  # voxel displacements
    fg = np.argwhere(mask)
    moved = np.rint(fg[:, None, :] + disp[None]).reshape(-1, 3)
    inside_image = np.all((moved >= 0) & (moved < np.array(mask.shape)), axis=1)
    moved = moved[inside_image]
    assert np.all(moved >= np.array(box.start)) and np.all(moved < np.array(box.stop))


def test_mask_box_gives_monais_generate_spatial_bounding_box_on_random_masks():
    """roi_box takes its box from flare23.data.boxes.mask_box (faster): the same box as MONAI's helper, empty included."""
    from monai.transforms.utils import generate_spatial_bounding_box

    from flare23.data.boxes import mask_box

    rng = np.random.default_rng(11)
    for shape in [(30, 25, 12), (9, 7), (40,), (1, 1, 1), (17, 1, 5)]:
        for density in (0.0, 0.0, 0.001, 0.05, 0.6):
            m = (rng.random(shape) < density) * rng.integers(-2, 4, shape)  # MONAI selects > 0, negatives are not foreground
            start, stop = generate_spatial_bounding_box(m[None], allow_smaller=True)
            no_box = all(e <= b for b, e in zip(start, stop))
            expected = None if no_box else tuple(slice(int(b), int(e)) for b, e in zip(start, stop))
            assert mask_box(m > 0) == expected
            t = torch.from_numpy(m)
            start_t, stop_t = generate_spatial_bounding_box(t[None], allow_smaller=True)
            assert (list(start_t), list(stop_t)) == (list(start), list(stop))
            assert mask_box(_numpy(t) > 0) == expected
    empty = np.zeros((6, 5, 4), np.uint8)
    assert generate_spatial_bounding_box(empty[None], allow_smaller=True) == ([0, 0, 0], [0, 0, 0]) and mask_box(empty) is None
    assert roi_box(empty, (1, 1, 1), empty.shape, np.eye(4)) is None


@pytest.mark.parametrize("perm, signs", [((0, 1, 2), (1, 1, 1)), ((0, 1, 2), (-1, -1, 1)), ((2, 0, 1), (1, -1, -1))])
def test_physical_and_spacing_margins_agree_for_an_axis_aligned_affine(perm, signs):
    """The two margin rules where they overlap: axis-aligned directions, one margin for feet, head and in-plane."""
    from flare23.data.boxes import spacing_margin_voxels
    from flare23.io import voxel_spacing

    rot = np.eye(3)[:, list(perm)] * np.array(signs, dtype=float)  # array axis j along world axis perm[j]
    for spacing in [(0.8, 1.2, 3.0), (0.7, 0.7, 2.5), (3.0, 1.0, 0.5)]:
        aff = make_affine(spacing, rot)
        np.testing.assert_allclose(voxel_spacing(aff), spacing)
        for m in (0.0, 2.4, 9.0, 10.0, 33.3):  # 2.4 mm is 3 voxels at 0.8, 9 mm is 3 voxels at 3.0 (no rounding up)
            below, above = physical_margin_voxels(aff, {"feet": m, "head": m, "inplane": m})
            assert tuple(below) == tuple(above) == spacing_margin_voxels(spacing, m)
        # unequal margins, feet at the lower index of the slice axis: in-plane axes by in-plane, the slice axis by feet / head
        margins = {"feet": 12.0, "head": 4.5, "inplane": 6.0}
        below, above = physical_margin_voxels(aff, margins)
        z = slice_axis(aff)
        head_up = rot[2, z] > 0
        for j in range(3):
            lo = margins["feet" if head_up else "head"] if j == z else margins["inplane"]
            hi = margins["head" if head_up else "feet"] if j == z else margins["inplane"]
            assert (below[j], above[j]) == (spacing_margin_voxels(spacing, lo)[j], spacing_margin_voxels(spacing, hi)[j])


@pytest.mark.parametrize("deg", [0, 20, -35])
def test_box_respects_physical_margins_for_oblique_directions(deg):
    shape = (48, 48, 40)
    aff = make_affine((2.0, 2.0, 3.0), rotation_x(deg))
    m = np.zeros(shape, np.uint8)
    m[18:30, 20:28, 15:24] = 1
    box = roi_box(m, (1, 1, 1), shape, aff)
    _assert_margins_respected(m, aff, box, MARGINS)
    # not wider than needed: at most one voxel beyond the extreme displacement on each side
    below, above = physical_margin_voxels(aff, MARGINS)
    lo, hi = bbox(m)
    assert np.all(np.array(box.start) >= np.maximum(0, lo - below))
    assert np.all(np.array(box.stop) <= np.minimum(shape, hi + above))
    if deg:
        assert below[1] > math.ceil(ROI_MARGIN_INPLANE_MM / 2.0)  # the tilt moves head-feet margin into axis 1


@pytest.mark.parametrize("strides", [(1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 4, 1), (4, 4, 2), (4, 4, 3)])
def test_box_maps_subsampled_voxels_to_every_full_voxel_they_touch(strides):
    shape = (37, 30, 25)
    sub_shape = subsampled_shape(shape, strides)
    rng = np.random.default_rng(sum(strides))
    sub = np.zeros(sub_shape, np.uint8)
    for _ in range(3):
        sub[tuple(rng.integers(0, n) for n in sub_shape)] = 1
    zero = {"feet": 0, "head": 0, "inplane": 0}
    box = roi_box(sub, strides, shape, make_affine((1.0, 1.0, 1.0)), zero)
    lo, hi = bbox(sub)
    for ax, s in enumerate(strides):  # brute force: full voxel i touches sub voxel c if |i - c s| < s/2 + 1/2
        touched = [i for i in range(shape[ax]) if any(abs(i - c * s) < s / 2 + 0.5 for c in range(lo[ax], hi[ax]))]
        assert (box.start[ax], box.stop[ax]) == (touched[0], touched[-1] + 1)
    up = upsample_mask(torch.from_numpy(sub), strides, shape).numpy()
    ulo, uhi = bbox(up)
    assert np.all(np.array(box.start) <= ulo) and np.all(np.array(box.stop) >= uhi)
    assert np.all(np.array(box.stop) - uhi <= 1) and np.all(ulo - np.array(box.start) <= 0)


def test_box_errors_and_empty_roi():
    aff = make_affine((1, 1, 1))
    assert roi_box(np.zeros((4, 4, 4)), (4, 4, 1), (16, 16, 4), aff) is None
    with pytest.raises(Flare23Error, match="not the shape"):
        roi_box(np.ones((4, 4, 4)), (4, 4, 1), (16, 16, 5), aff)
    with pytest.raises(Flare23Error, match="unknown ROI margin"):
        roi_box(np.ones((4, 4, 4)), (1, 1, 1), (4, 4, 4), aff, {"toes": 3})
    with pytest.raises(Flare23Error, match="non-negative"):
        roi_box(np.ones((4, 4, 4)), (1, 1, 1), (4, 4, 4), aff, {"feet": -3})


def test_box_json_corners_and_extents():
    aff = make_affine((0.8, 0.9, 2.5), rotation_x(10))
    box = RoiBox((2, 3, 4), (12, 13, 24), (20, 20, 30))
    info = box.to_json(aff)
    assert info["size"] == [10, 10, 20] and info["extent_mm"] == pytest.approx([8.0, 9.0, 50.0])
    corners = np.array(list(itertools.product([1.5, 11.5], [2.5, 12.5], [3.5, 23.5])))
    world = corners @ aff[:3, :3].T + aff[:3, 3]
    np.testing.assert_allclose(sorted(map(tuple, np.round(info["corners_mm"], 3))), sorted(map(tuple, np.round(world, 3))))
    np.testing.assert_allclose(info["min_mm"], world.min(0), atol=1e-3)
    json.dumps(info)  # serialisable


def test_real_ct_box_covers_every_organ_and_respects_margins(real_ct_dir):
    label, affine, _ = load_nifti(real_ct_dir / "label_flare.nii.gz")
    organs = np.isin(label, ORGAN_IDS)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    lo, hi = bbox(organs)
    # exact at full resolution: the margin in mm, rounded up to whole voxels, or the image edge
    box = roi_box(organs, (1, 1, 1), label.shape, affine)
    inplane = ROI_MARGIN_INPLANE_MM
    want_below = np.ceil(np.array([inplane, inplane, ROI_MARGIN_FEET_MM]) / spacing - 1e-6).astype(int)
    want_above = np.ceil(np.array([inplane, inplane, ROI_MARGIN_HEAD_MM]) / spacing - 1e-6).astype(int)
    assert box.start == tuple(int(v) for v in np.maximum(0, lo - want_below))
    assert box.stop == tuple(int(v) for v in np.minimum(label.shape, hi + want_above))
    # through the ROI strides (4, 4, 2 at 3 mm): every organ voxel is inside, margins hold up to half a stride
    strides = roi_strides(affine)
    assert strides == (4, 4, 2)
    box = roi_box(subsample(organs, strides), strides, label.shape, affine)
    assert organs[box.slices].sum() == organs.sum()
    for ax in range(3):
        below_mm = (lo[ax] - box.start[ax]) * spacing[ax]
        above_mm = (box.stop[ax] - hi[ax]) * spacing[ax]
        need_below = ROI_MARGIN_FEET_MM if ax == 2 else ROI_MARGIN_INPLANE_MM
        need_above = ROI_MARGIN_HEAD_MM if ax == 2 else ROI_MARGIN_INPLANE_MM
        slack = strides[ax] * spacing[ax] / 2
        assert box.start[ax] == 0 or below_mm >= need_below - slack
        assert box.stop[ax] == label.shape[ax] or above_mm >= need_above - slack
    # the same scan as LPS with z reversed: the same physical box
    ref = box.to_json(affine)
    organs2, aff2 = reoriented(organs, affine, "LPI")
    s2 = roi_strides(aff2)
    got = roi_box(subsample(organs2, s2), s2, organs2.shape, aff2).to_json(aff2)
    # the stride grid starts at the other end of flipped axes, so allow one stride of difference
    assert np.all(np.abs(np.array(got["min_mm"]) - ref["min_mm"]) <= np.array(strides) * spacing + 1e-6)
    assert np.all(np.abs(np.array(got["max_mm"]) - ref["max_mm"]) <= np.array(strides) * spacing + 1e-6)


# --- transforms -----------------------------------------------------------------------------------
def _image(shape=(41, 38, 29), spacing=(1.2, 1.2, 2.0), axcodes="RAS", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.normal(0, 300, shape).astype(np.float32)
    arr[10:30, 8:30, 5:25] += 600
    aff = make_affine(spacing)
    if axcodes != "RAS":
        arr, aff = reoriented(arr, aff, axcodes)
    return np.ascontiguousarray(arr), aff


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "ASL"])
def test_subsample_transform_meta_and_inverse(axcodes):
    arr, aff = _image(axcodes=axcodes)
    img = MetaTensor(torch.from_numpy(arr)[None], affine=torch.from_numpy(aff), meta={"filename_or_obj": "/x/c_0000.nii.gz"})
    pre = Compose([RoiSubsampled(keys="image"), Orientationd(keys="image", axcodes="RAS"), RoiNormalized(keys="image")])
    d = pre({"image": img})
    x = d["image"]
    strides = roi_strides(aff)
    assert _as_ints(x.meta[META_STRIDES]) == strides
    assert _as_ints(x.meta[META_FULL_SHAPE]) == arr.shape
    # the subsampled RAS affine maps every voxel to where the full-resolution voxel is
    offsets = ras_phase(aff, arr.shape, strides)
    assert _as_ints(x.meta[META_OFFSETS]) == offsets
    sub_in = subsample(arr, strides, offsets)
    ras, ras_aff = reoriented(sub_in, subsampled_affine(aff, strides, offsets), "RAS")
    np.testing.assert_allclose(x.affine.numpy(), ras_aff, atol=1e-6)
    # the same voxels as every s-th voxel of the RAS-oriented volume from its first one, whatever the file's order
    full_ras, full_ras_aff = reoriented(arr, aff, "RAS")
    np.testing.assert_array_equal(np.asarray(ras), np.asarray(subsample(full_ras, roi_strides(full_ras_aff))))
    if axcodes == "LPS":
        assert offsets[:2] == tuple((n - 1) % s for n, s in zip(arr.shape[:2], strides[:2])) and offsets[:2] != (0, 0)
    np.testing.assert_allclose(x[0].numpy(), normalise_roi(ras).numpy(), atol=1e-5)
    # a pointwise prediction on the RAS grid, mapped back, equals the same prediction made on the input grid
    pred = MetaTensor((x > 0.5).to(torch.uint8), meta=x.meta, applied_operations=x.applied_operations)
    expected_sub = (normalise_roi(sub_in) > 0.5).to(torch.uint8)
    expected = upsample_mask(expected_sub, strides, arr.shape, offsets)
    restored = RoiRestored(keys="pred")({"image": x, "pred": pred})["pred"]
    assert restored.shape == (1, *arr.shape) and restored.dtype == torch.uint8
    assert torch.equal(restored[0], expected)
    np.testing.assert_allclose(restored.affine.numpy(), aff, atol=1e-6)
    inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)({"image": x, "pred": pred})["pred"]
    assert torch.equal(inverted[0].to(torch.uint8), expected)
    np.testing.assert_allclose(inverted.affine.numpy(), aff, atol=1e-6)


def test_upsample_is_nearest_neighbour_with_ties_up():
    sub = torch.arange(4)[:, None, None].expand(4, 1, 1)
    up = upsample_mask(sub, (4, 1, 1), (14, 1, 1))[:, 0, 0].tolist()
    assert up == [min(3, math.floor(i / 4 + 0.5)) for i in range(14)]
    with pytest.raises(Flare23Error, match="not"):
        upsample_mask(sub, (4, 1, 1), (20, 1, 1))


def test_box_transform_writes_json_in_input_indices(tmp_path):
    arr, aff = _image(axcodes="LPS")
    img = MetaTensor(torch.from_numpy(arr)[None], affine=torch.from_numpy(aff), meta={"filename_or_obj": "/x/case_5_0000.nii.gz"})
    pre = Compose([RoiSubsampled(keys="image"), Orientationd(keys="image", axcodes="RAS"), RoiNormalized(keys="image")])
    x = pre({"image": img})["image"]
    pred = MetaTensor((x > 1.0).to(torch.uint8), meta=x.meta)
    out = RoiBoxd(keys="pred", output_dir=str(tmp_path))({"image": x, "pred": pred})
    strides = roi_strides(aff)
    expected = roi_box(normalise_roi(subsample(arr, strides)) > 1.0, strides, arr.shape, aff)
    written = json.loads((tmp_path / "case_5_roi_box.json").read_text())
    assert written["start"] == list(expected.start) and written["stop"] == list(expected.stop)
    assert out["roi_box"]["start"] == list(expected.start) and written["source"] == "/x/case_5_0000.nii.gz"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    with pytest.warns(UserWarning, match="empty box"):
        out = RoiBoxd(keys="pred")({"image": x, "pred": MetaTensor(torch.zeros_like(pred), meta=x.meta)})
    assert out["roi_box"]["empty"] is True and out["roi_box"]["start"] is None


def test_save_mask_writes_uint8_nifti_with_the_input_geometry(tmp_path):
    arr, aff = _image(axcodes="LAS")
    src = tmp_path / "case_9_0000.nii.gz"
    nib.save(nib.Nifti1Image(arr, aff), src)
    fg = torch.from_numpy((arr > 0).astype(np.uint8))[None]
    mask = MetaTensor(fg, affine=torch.from_numpy(aff), meta={"filename_or_obj": str(src)})
    RoiSaveMaskd(keys="pred", output_dir=str(tmp_path / "out"))({"pred": mask})
    img = nib.load(tmp_path / "out" / "case_9_roi.nii.gz")
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), (arr > 0).astype(np.uint8))
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PIR"])
def test_locate_equals_the_steps_done_by_hand(axcodes):
    arr, aff = _image(shape=(64, 60, 50), axcodes=axcodes, seed=2)
    net = ThresholdNet(0.8)
    margins = {"feet": 10, "head": 5, "inplane": 2}
    box, mask, strides, offsets = locate(net, torch.from_numpy(arr), aff, return_mask=True, margins_mm=margins)
    assert strides == roi_strides(aff)
    expected_mask = (normalise_roi(subsample(arr, strides, offsets)) > 0.8).to(torch.uint8)
    assert torch.equal(mask, expected_mask)
    assert box == roi_box(expected_mask, strides, arr.shape, aff, margins, offsets)
    # the network saw an RAS-ordered array (slices last)
    ras_shape = reoriented(subsample(arr, strides, offsets), subsampled_affine(aff, strides, offsets), "RAS")[0].shape
    assert net.shapes[0][2:] == tuple(-(-n // 16) * 16 for n in ras_shape)
    assert locate(ThresholdNet(1e6), arr, aff) is None


def test_box_coverage_and_metric():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[2:6, 2:6, 2:6] = 3
    lab[8, 8, 8] = TUMOR_ID  # tumor does not count
    box = RoiBox((0, 0, 0), (10, 10, 4), (10, 10, 10))
    assert box_coverage(box, lab) == pytest.approx(32 / 64)
    assert box_coverage(box.to_json(np.eye(4)), lab) == pytest.approx(0.5)
    assert box_coverage(None, lab) == 0.0 and box_coverage(None, np.zeros((2, 2, 2))) == 1.0
    mean, low = BoxCoverage("mean"), BoxCoverage("min")
    for m in (mean, low):
        m.reset()
        m.update([torch.tensor(0.5), 1.0])
        m.update([0.9])
    assert mean.compute() == pytest.approx(2.4 / 3) and low.compute() == pytest.approx(0.5)
    with pytest.raises(Flare23Error):
        BoxCoverage("max")


def test_reorient_refuses_grids_that_are_not_flips_of_each_other():
    with pytest.raises(Flare23Error, match="flips and a permutation"):
        reorient(torch.zeros(4, 4, 4), make_affine((1, 1, 1)), make_affine((1, 1, 1), rotation_x(30)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = torch.arange(24).reshape(2, 3, 4)
        a = make_affine((1, 2, 3))
        b = a @ inv_ornt_aff(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("PIL")), (2, 3, 4))
        y = reorient(x, a, b)
        assert torch.equal(reorient(y, b, a), x)
        t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("PIL"))
        np.testing.assert_array_equal(y.numpy(), apply_orientation(x.numpy(), t))


def test_locate_draws_the_same_box_for_a_real_scan_in_any_axis_order(real_dicom_dir):
    """The DICOM series (LAS), and the same voxels reoriented RAS and PSL: the same box, in world millimetres.

    Subsampling from index 0 in each file's own order picks other voxels (the box then moves by up to a
    stride, and the crops and labels differ); :func:`ras_phase` picks the same ones.
    """
    from flare23.data.readers import list_cases, read_case

    [case] = list_cases(real_dicom_dir / "dicom")
    array, affine, _ = read_case(case)
    base = nib.Nifti1Image(array, affine)
    copies = [base, nib.as_closest_canonical(base)]
    copies.append(base.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("PSL"))))
    margins = {"feet": 0, "head": 0, "inplane": 0}
    boxes, naive = [], []
    for img in copies:
        arr, aff = torch.from_numpy(np.ascontiguousarray(np.asarray(img.dataobj))), img.affine
        box = locate(ThresholdNet(1.5), arr, aff, margins_mm=margins)
        info = box.to_json(aff)
        boxes.append((info["min_mm"], info["max_mm"]))
        # the same steps with the subsampling starting at index 0 of the file's order
        strides = roi_strides(aff)
        sub = subsample(arr, strides)
        sub_ras = reorient(sub, subsampled_affine(aff, strides), ras_affine(subsampled_affine(aff, strides), sub.shape))
        mask = reorient((normalise_roi(sub_ras) > 1.5).to(torch.uint8), ras_affine(subsampled_affine(aff, strides), sub.shape), subsampled_affine(aff, strides))
        old = roi_box(mask, strides, arr.shape, aff, margins).to_json(aff)
        naive.append((old["min_mm"], old["max_mm"]))
    assert boxes[0][0] != boxes[0][1]
    for other in boxes[1:]:
        assert np.allclose(other, boxes[0], atol=1e-3), (other, boxes[0])
    assert any(not np.allclose(n, naive[0], atol=1e-3) for n in naive[1:])  # the phase is what makes them agree
