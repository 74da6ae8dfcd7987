"""Bounding boxes in voxels: the tight box of a mask and margins in mm turned into whole voxels (torch-free).

* :func:`mask_box`: the tight box of the nonzero voxels, used by the data tools, the metrics and the
  ROI box (:func:`flare23.roi.box.roi_box`).
* :func:`whole_voxels`: the one rounding rule of every margin, a displacement in voxels rounded up
  (at least the requested millimetres).
* :func:`spacing_margin_voxels`: margins in mm along the array axes -> voxels per axis, from the
  voxel spacing. Its physical counterpart, feet / head / in-plane margins through an (oblique)
  affine, is :func:`flare23.roi.box.physical_margin_voxels`; the two agree for an axis-aligned affine
  with equal margins.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flare23.errors import Flare23Error


def mask_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box of the nonzero voxels of ``mask`` (one slice per axis), ``None`` if there are none.

    From one ``any`` projection per axis: about 1 ms for a 120 x 120 x 80 mask, where ``np.argwhere`` takes
    24 ms and ``scipy.ndimage.find_objects`` 9 ms (the training context crop computes it for every patch).
    Ours rather than MONAI's ``generate_spatial_bounding_box`` (same box, tested against it): MONAI's
    makes a channel copy, projects each axis over the others again, and on a torch tensor loops
    ``torch.any`` one axis at a time; on the ROI extractor's subsampled CPU mask (128 x 128 x 60) it
    takes about 35 ms where this takes 1 ms, on a 512 x 512 x 120 numpy mask 34 ms where this takes 17 ms.
    """
    mask = np.asarray(mask)
    if mask.dtype != bool:
        mask = mask != 0
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def whole_voxels(extent) -> np.ndarray:
    """A displacement in voxels (per axis, >= 0 where negative) rounded up to whole voxels, as floats.

    The small tolerance keeps 9 mm at 3 mm spacing at 3 voxels despite rounding in the affine.
    """
    return np.ceil(np.maximum(0.0, np.asarray(extent, dtype=float)) - 1e-6)


def spacing_margin_voxels(spacing: Sequence[float], margin_mm: float | Sequence[float]) -> tuple[int, ...]:
    """Margin in voxels per array axis: ``ceil(margin_mm / spacing)`` (at least the requested millimetres).

    ``margin_mm``: one value for every axis or one per axis, along the array axes (not physical directions).
    """
    spacing = np.asarray(spacing, dtype=float)
    margin = np.broadcast_to(np.asarray(margin_mm, dtype=float), spacing.shape)
    if np.any(margin < 0) or not np.all(np.isfinite(margin)):
        raise Flare23Error(f"margin_mm must be finite and >= 0, got {margin_mm}")
    return tuple(int(v) for v in whole_voxels(margin / spacing))


__all__ = ["mask_box", "spacing_margin_voxels", "whole_voxels"]
