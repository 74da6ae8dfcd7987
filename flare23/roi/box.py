"""The crop box from an ROI mask: foreground box mapped to full resolution, physical margins, clamping (METHOD.md section 3)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flare23.constants import (
    ROI_CLIP,
    ROI_INPLANE_STRIDE,
    ROI_MAX_WHOLE_SLICES,
    ROI_PAD_MULTIPLE,
    ROI_PATCH_XYZ,
    ROI_SLICE_TARGET_MM,
)
from flare23.data.boxes import mask_box, whole_voxels
from flare23.data.grids import reorient
from flare23.errors import Flare23Error
from flare23.io import voxel_spacing
from flare23.roi.geometry import (
    DEFAULT_MARGINS_MM,
    _affine,
    _numpy,
    _offsets,
    _tensor,
    ras_affine,
    ras_phase,
    roi_strides,
    subsample,
    subsampled_affine,
    subsampled_shape,
)
from flare23.roi.predict import normalise_roi, roi_predict


# --- the box ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoiBox:
    """A box of full-resolution voxel indices: ``start`` inclusive, ``stop`` exclusive, in an image of ``shape``."""

    start: tuple[int, ...]
    stop: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    def contains(self, index) -> bool:
        return all(a <= int(i) < b for i, a, b in zip(index, self.start, self.stop))

    def to_json(self, affine) -> dict:
        """Voxel indices and physical extents: ``corners_mm`` are the 8 outer voxel-edge corners in world (RAS) mm."""
        a = _affine(affine)
        spacing = voxel_spacing(a)
        lo, hi = np.asarray(self.start, float) - 0.5, np.asarray(self.stop, float) - 0.5
        corners = np.array([[(lo, hi)[b][i] for i, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
        world = corners @ a[:3, :3].T + a[:3, 3]
        return {
            "empty": False,
            "start": list(self.start),
            "stop": list(self.stop),
            "size": list(self.size),
            "image_shape": list(self.shape),
            "spacing_mm": [round(float(s), 6) for s in spacing],
            "extent_mm": [round(float(n * s), 4) for n, s in zip(self.size, spacing)],
            "min_mm": [round(float(v), 4) for v in world.min(0)],
            "max_mm": [round(float(v), 4) for v in world.max(0)],
            "corners_mm": [[round(float(v), 4) for v in c] for c in world],
            "affine": [[float(v) for v in row] for row in a],
        }


def empty_box_json(shape: Sequence[int], affine) -> dict:
    return {"empty": True, "start": None, "stop": None, "size": None, "image_shape": [int(s) for s in shape],
            "spacing_mm": [round(float(s), 6) for s in voxel_spacing(_affine(affine))]}  # fmt: skip


def physical_margin_voxels(affine, margins_mm: Mapping[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Voxels to add below / above the box on each array axis for physical margins (see the module doc).

    ``margins_mm``: towards the ``feet``, the ``head`` and ``inplane`` (R-L and A-P), in mm, through
    ``affine`` (oblique included); rounded by :func:`flare23.data.boxes.whole_voxels`. For margins along the
    array axes from the spacing alone: :func:`flare23.data.boxes.spacing_margin_voxels` (the same numbers for
    an axis-aligned affine and equal margins).
    """
    m = dict(DEFAULT_MARGINS_MM)
    if margins_mm:
        unknown = set(margins_mm) - set(m)
        if unknown:
            raise Flare23Error(f"unknown ROI margin(s) {sorted(unknown)}; expected feet, head, inplane")
        m.update({k: float(v) for k, v in margins_mm.items()})
    if any(not math.isfinite(v) or v < 0 for v in m.values()):
        raise Flare23Error(f"ROI margins must be non-negative numbers of mm, got {m}")
    inv = np.linalg.inv(_affine(affine)[:3, :3])
    region = np.array(
        [[x, y, z] for x in (-m["inplane"], m["inplane"]) for y in (-m["inplane"], m["inplane"]) for z in (-m["feet"], m["head"])]
    )
    vox = region @ inv.T  # world displacement -> voxel displacement, 8 corners of a convex region
    below = whole_voxels(-vox.min(0)).astype(int)
    above = whole_voxels(vox.max(0)).astype(int)
    return below, above


def roi_box(
    mask_sub,
    strides: Sequence[int],
    full_shape: Sequence[int],
    affine,
    margins_mm: Mapping[str, float] | None = None,
    offsets: Sequence[int] | None = None,
) -> RoiBox | None:
    """Full-resolution box of the foreground (> 0) of a subsampled mask, widened by physical margins.

    ``mask_sub``: the mask on the subsampled grid (``(*spatial)`` or with leading singleton axes),
    in the same array order as ``full_shape`` and ``affine`` (the full-resolution image's), subsampled
    from ``offsets`` (:func:`ras_phase`; default 0). Returns ``None`` when there is no foreground.
    The foreground's box is :func:`flare23.data.boxes.mask_box` on the mask in numpy (a tensor is moved to
    the CPU): the box of MONAI's ``generate_spatial_bounding_box`` (tested), in about 1 ms where MONAI's
    takes 35 ms on a 128 x 128 x 60 CPU tensor.
    """
    m = _numpy(mask_sub)
    while m.ndim > 3 and m.shape[0] == 1:
        m = m[0]
    full_shape = tuple(int(s) for s in full_shape)
    strides = tuple(int(s) for s in strides)
    if m.ndim != 3 or len(full_shape) != 3 or len(strides) != 3:
        raise Flare23Error(f"roi_box: expected a 3D mask, shape and strides, got {tuple(m.shape)}, {full_shape}, {strides}")
    offsets = _offsets(offsets, 3)
    if tuple(m.shape) != subsampled_shape(full_shape, strides, offsets):
        raise Flare23Error(
            f"roi_box: mask shape {tuple(m.shape)} is not the shape {full_shape} subsampled by {strides} "
            f"({subsampled_shape(full_shape, strides, offsets)})"
        )
    a = _affine(affine)
    box_sub = mask_box(m > 0)
    if box_sub is None:
        return None
    below, above = physical_margin_voxels(a, margins_mm)
    start, stop = [], []
    for i in range(3):
        s, lo, last = strides[i], box_sub[i].start, box_sub[i].stop - 1
        first_full = math.floor(lo * s + offsets[i] - s / 2 + 0.5)
        last_full = math.ceil(last * s + offsets[i] + s / 2 - 0.5)
        start.append(max(0, first_full - int(below[i])))
        stop.append(min(full_shape[i], last_full + 1 + int(above[i])))
    return RoiBox(tuple(start), tuple(stop), full_shape)


def upsample_mask(
    mask_sub: torch.Tensor, strides: Sequence[int], full_shape: Sequence[int], offsets: Sequence[int] | None = None
) -> torch.Tensor:
    """Nearest-neighbour upsampling of the last three axes: full voxel ``i`` takes subsampled voxel ``round((i - o) / s)``.

    (Ties go up; indices before the first / past the last subsampled voxel take the first / last one.) The result has
    ``full_shape`` on the last three axes; ``mask_sub`` must have ``subsampled_shape(full_shape, strides)``.
    """
    full_shape = tuple(int(n) for n in full_shape)
    strides = tuple(int(s) for s in strides)
    offsets = _offsets(offsets, 3)
    if tuple(mask_sub.shape[-3:]) != subsampled_shape(full_shape, strides, offsets):
        raise Flare23Error(f"mask shape {tuple(mask_sub.shape[-3:])} is not {full_shape} subsampled by {strides}")
    out = mask_sub
    lead = mask_sub.ndim - 3
    for i, (n, s, o) in enumerate(zip(full_shape, strides, offsets)):
        if s == 1 and o == 0:
            continue
        idx = torch.div(2 * (torch.arange(n, device=mask_sub.device) - o) + s, 2 * s, rounding_mode="floor")
        out = out.index_select(lead + i, idx.clamp_(min=0, max=mask_sub.shape[lead + i] - 1))
    return out


def locate(
    network,
    image,
    affine,
    device=None,
    autocast=None,
    margins_mm: Mapping[str, float] | None = None,
    max_whole_slices: int = ROI_MAX_WHOLE_SLICES,
    tile: Sequence[int] = ROI_PATCH_XYZ,
    pad_multiple: int = ROI_PAD_MULTIPLE,
    inplane_stride: int = ROI_INPLANE_STRIDE,
    slice_target_mm: float = ROI_SLICE_TARGET_MM,
    return_mask: bool = False,
    mirror_axes: Sequence[int] = (),
    clip: Sequence[float] = ROI_CLIP,
):
    """The whole ROI stage on a full-resolution CT ``image`` ``(X, Y, Z)`` (any array order) with ``affine``.

    Subsample (a view), reorient the small array to RAS, normalise, :func:`roi_predict` (with
    ``mirror_axes`` in RAS order), back to the input's order, :func:`roi_box`. Same steps as the
    bundle's inference.json. Returns the :class:`RoiBox` (or ``None`` when the ROI is empty), and
    with ``return_mask=True`` also the subsampled mask (input order, uint8), the strides and the
    offsets (:func:`ras_phase`: the same voxels, so the same box, whatever the file's axis order).
    """
    a = _affine(affine)
    img = _tensor(image)
    if img.ndim != 3:
        raise Flare23Error(f"locate: expected a 3D image, got shape {tuple(img.shape)}")
    strides = roi_strides(a, inplane_stride, slice_target_mm)
    offsets = ras_phase(a, img.shape, strides)
    sub = subsample(img, strides, offsets)
    sub_affine = subsampled_affine(a, strides, offsets)
    target = ras_affine(sub_affine, sub.shape)
    device = torch.device(device) if device is not None else next(network.parameters()).device
    x = reorient(sub, sub_affine, target).to(device, non_blocking=True)
    x = normalise_roi(x, clip)[None, None]
    mask = roi_predict(network, x, max_whole_slices, tile, pad_multiple, -1, autocast, mirror_axes)[0, 0]
    mask = reorient(mask, target, sub_affine).cpu()
    box = roi_box(mask, strides, img.shape, a, margins_mm, offsets)
    return (box, mask, strides, offsets) if return_mask else box


# --- MONAI transforms ---------------------------------------------------------------------------
def _where(x) -> str:
    meta = getattr(x, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else "image"


def _as_ints(v) -> tuple[int, ...]:
    return tuple(int(i) for i in np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v).reshape(-1))
