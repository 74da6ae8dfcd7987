"""Resampling on the device: images forward to a model grid, class probabilities back to labels.

:func:`resample_labels` is step 4 of the inference pipeline (METHOD.md section 5): the
low-resolution class probabilities (or logits) of the organ or tumor model are interpolated
trilinearly back to the crop grid and turned into a label map with an arg-max, block by block,
on whatever device the probabilities are on. Only ``block`` output slices along one axis exist at
full resolution at any time, so the extra device memory is ``O(C x block x plane)`` whatever the
length of the scan, and the labels are moved to ``out_device`` (e.g. the CPU) block by block.

The result is the arg-max of ``F.interpolate(probs[None], size=out_shape, mode="trilinear",
align_corners=False)`` (voxel centres mapped with ``src = (dst + 0.5) * in / out - 0.5``, the edges
of the two grids aligned). Trilinear interpolation is separable: along the blocked axis this
module computes torch's source indices and weights itself, for the whole axis at once, and every
block reads only the low-resolution slices that its output slices need (the two neighbours of each
source coordinate, i.e. one slice of context on each side). In-plane, ``F.interpolate(bilinear)``
does the work. Each output slice is thus computed by the same operations from the same inputs
whatever the block size, so blocked and unblocked results are identical (no seams); they agree
with torch's whole-volume trilinear arg-max up to floating-point rounding (ties within ~1e-6).

The arg-max uses ``Tensor.max(0).indices``, about three times faster than ``argmax(0)`` on the
CPU (BUNDLES.md). Measured baseline (MEASUREMENTS.md): this kind of blocked torch resampling is
about ten times faster than nnU-Net's export path.

:func:`resample_image` is the forward counterpart for the preprocessing (a thin float32 wrapper
over ``F.interpolate`` with the same convention), so both directions map voxel centres alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: Output slices interpolated at once (METHOD.md section 5, step 4).
DEFAULT_BLOCK = 150

_IMAGE_MODES = ("trilinear", "nearest", "nearest-exact", "area")


def _check_shape(out_shape: Sequence[int], what: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in out_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{what}: out_shape must be three positive sizes, got {tuple(out_shape)}")
    return shape


def linear_source_weights(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch's ``align_corners=False`` linear-interpolation indices and weights along one axis.

    Returns ``(i0, i1, w1)`` for every output index ``d``: ``src = max(0, (d + 0.5) * in / out -
    0.5)`` computed in float32 as torch does, ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``,
    ``w1 = src - i0``; the value is ``(1 - w1) * x[i0] + w1 * x[i1]``.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in={in_size}, out={out_size}")
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    dst = torch.arange(out_size, dtype=torch.float32)
    src = (scale * (dst + 0.5) - 0.5).clamp_(min=0.0)
    i0 = src.to(torch.int64)  # src >= 0: truncation is floor
    i1 = torch.clamp(i0 + 1, max=in_size - 1)
    w1 = src - i0.to(torch.float32)
    return i0, i1, w1


def resample_labels(
    probs: torch.Tensor,
    out_shape: Sequence[int],
    block: int = DEFAULT_BLOCK,
    axis: int = -1,
    out_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Arg-max labels of ``probs`` interpolated trilinearly to ``out_shape``, in blocks of slices.

    Args:
        probs: ``(C, D0, D1, D2)`` probabilities or logits on any device, any float dtype (fp16 and
            bf16 included; every block is computed in float32). At most 256 classes.
        out_shape: the three output sizes ``(O0, O1, O2)`` (e.g. the crop's shape).
        block: number of output slices along ``axis`` computed at once; it bounds device memory.
        axis: spatial axis (0, 1, 2 or negative) cut into blocks, normally the slice axis: the last
            one in MONAI's RAS (x, y, z) order, hence the default ``-1``.
        out_device: where the label map is returned (default: the device of ``probs``); blocks are
            copied there as they are done, so a CUDA computation can return a CPU map.

    Returns:
        ``uint8`` tensor of shape ``out_shape`` equal to ``argmax(F.interpolate(probs[None],
        size=out_shape, mode="trilinear", align_corners=False)[0], 0)`` (ties between classes
        resolved towards the lower class index), identical for every ``block``.
    """
    if not isinstance(probs, torch.Tensor) or probs.ndim != 4:
        raise ValueError(f"resample_labels: probs must be a (C, D0, D1, D2) tensor, got {getattr(probs, 'shape', type(probs))}")
    if not probs.is_floating_point():
        raise ValueError(f"resample_labels: probs must be floating point, got {probs.dtype}")
    n_classes = probs.shape[0]
    if not 1 <= n_classes <= 256:
        raise ValueError(f"resample_labels: {n_classes} classes do not fit a uint8 label map")
    out_shape = _check_shape(out_shape, "resample_labels")
    block = int(block)
    if block < 1:
        raise ValueError(f"resample_labels: block must be >= 1, got {block}")
    if not -3 <= axis <= 2:
        raise ValueError(f"resample_labels: axis must be a spatial axis in -3..2, got {axis}")
    axis = axis % 3
    device = probs.device
    out_device = device if out_device is None else torch.device(out_device)

    in_len, out_len = probs.shape[1 + axis], out_shape[axis]
    plane_out = tuple(s for a, s in enumerate(out_shape) if a != axis)
    plane_in = tuple(s for a, s in enumerate(probs.shape[1:]) if a != axis)
    i0_all, i1_all, w1_all = linear_source_weights(in_len, out_len)
    w0_all = 1.0 - w1_all
    # Order of the two separable passes, fixed for the whole call (so that every block computes
    # its slices the same way): the in-plane pass first when the blocked axis is upsampled (fewer
    # low-resolution slices than output slices to interpolate in-plane), else the axial pass first.
    plane_first = in_len <= out_len
    same_plane = plane_in == plane_out
    # The blocked axis becomes dim 1: (C, L, P0, P1); a view, nothing is copied here.
    src = probs.movedim(1 + axis, 1)
    labels = torch.empty(out_shape, dtype=torch.uint8, device=out_device)
    labels_view = labels.movedim(axis, 0)  # (O_axis, Q0, Q1), a view that shares storage

    def in_plane(x: torch.Tensor) -> torch.Tensor:  # (C, n, P0, P1) float32 -> (C, n, Q0, Q1)
        if same_plane:
            return x
        c, n = x.shape[:2]
        y = F.interpolate(x.reshape(1, c * n, *plane_in), size=plane_out, mode="bilinear", align_corners=False)
        return y.reshape(c, n, *plane_out)

    for start in range(0, out_len, block):
        stop = min(start + block, out_len)
        i0, i1 = i0_all[start:stop], i1_all[start:stop]
        lo, hi = int(i0[0]), int(i1[-1]) + 1  # source indices are non-decreasing
        slab = src[:, lo:hi].to(torch.float32)
        w0 = w0_all[start:stop].to(device).view(1, -1, 1, 1)
        w1 = w1_all[start:stop].to(device).view(1, -1, 1, 1)
        k0, k1 = (i0 - lo).to(device), (i1 - lo).to(device)
        if plane_first:
            slab = in_plane(slab)
            vals = slab.index_select(1, k0).mul_(w0).add_(slab.index_select(1, k1).mul_(w1))
        else:
            vals = slab.index_select(1, k0).mul_(w0).add_(slab.index_select(1, k1).mul_(w1))
            vals = in_plane(vals)
        del slab
        lab = vals.max(0).indices.to(torch.uint8)
        del vals
        labels_view[start:stop].copy_(lab, non_blocking=False)
    return labels


def resample_image(image: torch.Tensor, out_shape: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Resample a ``(D0, D1, D2)`` image to ``out_shape`` in float32 on its own device.

    Same voxel-centre convention as :func:`resample_labels` (``align_corners=False`` for
    ``trilinear``), so the forward preprocessing and the backward label resampling map the same
    physical points. ``mode`` is one of ``trilinear``, ``nearest``, ``nearest-exact``, ``area``.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise ValueError(f"resample_image: image must be a (D0, D1, D2) tensor, got {getattr(image, 'shape', type(image))}")
    if mode not in _IMAGE_MODES:
        raise ValueError(f"resample_image: mode must be one of {', '.join(_IMAGE_MODES)}, got {mode!r}")
    out_shape = _check_shape(out_shape, "resample_image")
    x = image.to(torch.float32)
    if tuple(x.shape) == out_shape:
        return x.clone() if x.data_ptr() == image.data_ptr() else x
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(x[None, None], size=out_shape, mode=mode, **kwargs)[0, 0]
