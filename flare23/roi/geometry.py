"""Geometry of the ROI extractor's input: the slice axis, strides, the RAS phase, stride subsampling (a view) and the subsampled grid's affine; the ROI label map."""

from __future__ import annotations

import math
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch

from flare23.constants import (
    ORGAN_IDS,
    ROI_INPLANE_STRIDE,
    ROI_MARGIN_FEET_MM,
    ROI_MARGIN_HEAD_MM,
    ROI_MARGIN_INPLANE_MM,
    ROI_SLICE_TARGET_MM,
    TUMOR_ID,
)
from flare23.errors import Flare23Error
from flare23.io import check_affine, voxel_spacing

#: Default physical margins of the box, in mm.
DEFAULT_MARGINS_MM: dict[str, float] = {"feet": ROI_MARGIN_FEET_MM, "head": ROI_MARGIN_HEAD_MM, "inplane": ROI_MARGIN_INPLANE_MM}

#: Meta-data keys written by :class:`RoiSubsample` (tensors, so that they survive collation).
META_STRIDES = "roi_strides"
META_FULL_SHAPE = "roi_full_shape"
META_FULL_AFFINE = "roi_full_affine"
META_OFFSETS = "roi_offsets"


# --- geometry -----------------------------------------------------------------------------------
def _affine(affine) -> np.ndarray:
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=float)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    check_affine(a, "ROI geometry")
    return a


def slice_axis(affine) -> int:
    """The array axis most aligned with the patient's S-I direction (largest |S| direction cosine)."""
    a = _affine(affine)[:3, :3]
    cosines = np.abs(a[2]) / np.linalg.norm(a, axis=0)
    return int(np.argmax(cosines))


def slice_stride(spacing_z_mm: float, target_mm: float = ROI_SLICE_TARGET_MM) -> int:
    """k = max(1, round(target / slice spacing)); Python's ``round`` (ties to even: 2.0 mm -> 2)."""
    spacing = float(spacing_z_mm)
    if not math.isfinite(spacing) or spacing <= 0:
        raise Flare23Error(f"slice spacing must be a positive number of mm, got {spacing_z_mm}")
    return max(1, int(round(float(target_mm) / spacing)))


def roi_strides(affine, inplane: int = ROI_INPLANE_STRIDE, target_mm: float = ROI_SLICE_TARGET_MM) -> tuple[int, int, int]:
    """Per-axis strides of a 3D array with ``affine``: ``inplane`` except :func:`slice_stride` on the slice axis."""
    a = _affine(affine)
    axis = slice_axis(a)
    spacing = voxel_spacing(a)
    return tuple(slice_stride(spacing[i], target_mm) if i == axis else int(inplane) for i in range(3))


def _offsets(offsets, n: int) -> tuple[int, ...]:
    return (0,) * n if offsets is None else tuple(int(o) for o in offsets)


def ras_phase(affine, shape: Sequence[int], strides: Sequence[int]) -> tuple[int, ...]:
    """First subsampled voxel of each array axis: the voxels of the RAS-oriented volume's every ``s``-th voxel.

    0 on an axis that runs as in RAS, ``(n - 1) % s`` on a flipped one. Subsampling from index 0 in the
    file's own order picks other voxels for the same scan stored LPS, RAS or as a DICOM series (LAS),
    so the ROI network saw other voxels and drew another box; with this phase it sees the same ones.
    """
    a = _affine(affine)
    shape = tuple(int(n) for n in shape[-3:])
    t = np.rint(np.linalg.solve(ras_affine(a, shape), a)[:3, :3])  # input voxel -> RAS voxel
    return tuple((shape[i] - 1) % int(strides[i]) if t[:, i].sum() < 0 else 0 for i in range(3))


def subsampled_shape(full_shape: Sequence[int], strides: Sequence[int], offsets: Sequence[int] | None = None) -> tuple[int, ...]:
    offsets = _offsets(offsets, len(strides))
    return tuple(-(-(int(n) - o) // int(s)) for n, s, o in zip(full_shape, strides, offsets))


def subsample(volume, strides: Sequence[int], offsets: Sequence[int] | None = None):
    """Every ``strides[i]``-th voxel of the last ``len(strides)`` axes, from ``offsets[i]`` (default 0; a view)."""
    strides = [int(s) for s in strides]
    if min(strides) < 1:
        raise Flare23Error(f"strides must be positive integers, got {strides}")
    offsets = _offsets(offsets, len(strides))
    return volume[(Ellipsis, *(slice(o, None, s) for s, o in zip(strides, offsets)))]


def subsampled_affine(affine, strides: Sequence[int], offsets: Sequence[int] | None = None) -> np.ndarray:
    """Affine of :func:`subsample`'s output: voxel ``j`` is full-resolution voxel ``o + j * s``."""
    step = np.diag([*(float(s) for s in strides), 1.0])
    step[:3, 3] = _offsets(offsets, 3)
    return _affine(affine) @ step


def ras_affine(affine, shape: Sequence[int]) -> np.ndarray:
    """Affine of the array of ``shape`` / ``affine`` after MONAI's ``Orientation(axcodes="RAS")``."""
    a = _affine(affine)
    ornt = nib.orientations.io_orientation(a)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    return a @ nib.orientations.inv_ornt_aff(transform, tuple(int(s) for s in shape))


# --- intensities and labels ---------------------------------------------------------------------
def _numpy(x) -> np.ndarray:
    """A numpy array of ``x`` (a tensor is detached and moved to the CPU; bfloat16, which numpy lacks, becomes float32)."""
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


def _tensor(x) -> torch.Tensor:
    """``torch.as_tensor`` that also takes numpy views with negative strides (flipped arrays)."""
    if isinstance(x, np.ndarray) and any(s < 0 for s in x.strides):
        x = np.ascontiguousarray(x)
    return torch.as_tensor(x)


def roi_labels(label, where: str = "label"):
    """Organ ids (1..13) -> 1; tumor (14) and background -> 0 (uint8). Other values are an error."""
    t = _tensor(label)
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise Flare23Error(f"{where}: label map has non-integer values")
        t = t.round()
    lo, hi = (float(t.min()), float(t.max())) if t.numel() else (0.0, 0.0)
    if lo < 0 or hi > TUMOR_ID:
        raise Flare23Error(f"{where}: label values must be in 0..{TUMOR_ID}, found {lo:g}..{hi:g}")
    return ((t >= min(ORGAN_IDS)) & (t <= max(ORGAN_IDS))).to(torch.uint8)
