"""ROI extractor inference on a subsampled volume: normalisation, whole-volume or tiled prediction, mirrored passes (METHOD.md section 3)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import NormalizeIntensity

from flare23.constants import (
    ROI_CLIP,
    ROI_MAX_WHOLE_SLICES,
    ROI_PAD_MULTIPLE,
    ROI_PATCH_XYZ,
)
from flare23.errors import Flare23Error
from flare23.roi.geometry import _tensor

_ZSCORE = NormalizeIntensity(nonzero=False, channel_wise=False, dtype=torch.float32)


def normalise_roi(x, clip: Sequence[float] = ROI_CLIP) -> torch.Tensor:
    """Clip to ``clip`` then z-score with the mean and (population) std of the clipped volume; float32."""
    t = _tensor(x)
    t = t.float() if t.dtype != torch.float32 else t.clone()
    t = t.clamp_(float(clip[0]), float(clip[1]))
    return _ZSCORE(t)


# --- inference ----------------------------------------------------------------------------------
def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pads = []
    for n in reversed(x.shape[2:]):
        pads += [0, (-n) % multiple]
    return F.pad(x, pads) if any(pads) else x


def _run(network, x: torch.Tensor, pad_multiple: int) -> torch.Tensor:
    shape = x.shape[2:]
    out = network(_pad_to_multiple(x, pad_multiple))
    return out[(Ellipsis, *(slice(0, n) for n in shape))].float()


def _mirror_dims(mirror_axes) -> tuple[int, ...]:
    axes = tuple(int(a) for a in (mirror_axes or ()))
    if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise Flare23Error(f"mirror_axes must be distinct spatial axes among 0, 1, 2, got {list(mirror_axes)}")
    return tuple(2 + a for a in axes)


def roi_logits(
    network,
    x_sub: torch.Tensor,
    max_whole_slices: int = ROI_MAX_WHOLE_SLICES,
    tile: Sequence[int] = ROI_PATCH_XYZ,
    pad_multiple: int = ROI_PAD_MULTIPLE,
    slice_dim: int = -1,
    autocast=None,
    mirror_axes: Sequence[int] = (),
) -> torch.Tensor:
    """Logits ``(B, C, *spatial)`` of ``network`` on the normalised subsampled volume ``x_sub`` ``(B, 1, *spatial)``.

    At most ``max_whole_slices`` along spatial axis ``slice_dim``: one pass on the whole volume,
    zero-padded at the end of each axis to a multiple of ``pad_multiple``. More: non-overlapping
    tiles of shape ``tile`` (same axis order as ``x_sub``); the last tile of an axis is the rest,
    padded to ``pad_multiple``. ``autocast``: an optional context manager (e.g. ``torch.autocast``).

    ``mirror_axes``: spatial axes (0, 1, 2 of ``x_sub``) of extra passes on the mirrored volume
    (test-time mirroring, as nnU-Net does by default; not in the paper). Then the result is the
    log of the mean of the passes' softmax probabilities (valid logits: their softmax is that mean).
    """
    if x_sub.ndim != 5:
        raise Flare23Error(f"the ROI network input must be (B, 1, X, Y, Z), got shape {tuple(x_sub.shape)}")
    dims = _mirror_dims(mirror_axes)
    x = x_sub.as_tensor() if isinstance(x_sub, MetaTensor) else x_sub
    if not dims:
        return _roi_logits_once(network, x, max_whole_slices, tile, pad_multiple, slice_dim, autocast)
    prob = torch.softmax(_roi_logits_once(network, x, max_whole_slices, tile, pad_multiple, slice_dim, autocast), 1)
    for d in dims:
        mirrored = _roi_logits_once(network, x.flip(d), max_whole_slices, tile, pad_multiple, slice_dim, autocast)
        prob += torch.softmax(mirrored, 1).flip(d)
    return prob.div_(1 + len(dims)).log_()


def _roi_logits_once(network, x, max_whole_slices, tile, pad_multiple, slice_dim, autocast) -> torch.Tensor:
    spatial = tuple(int(s) for s in x.shape[2:])
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    with ctx:
        if spatial[slice_dim] <= int(max_whole_slices):
            return _run(network, x, pad_multiple)
        tile = [int(t) for t in tile]
        out = None
        for i0 in range(0, spatial[0], tile[0]):
            for i1 in range(0, spatial[1], tile[1]):
                for i2 in range(0, spatial[2], tile[2]):
                    sl = (slice(i0, i0 + tile[0]), slice(i1, i1 + tile[1]), slice(i2, i2 + tile[2]))
                    y = _run(network, x[(Ellipsis, *sl)], pad_multiple)
                    if out is None:
                        out = y.new_empty((x.shape[0], y.shape[1], *spatial))
                    out[(Ellipsis, *sl)] = y
        return out


def roi_predict(
    network,
    x_sub: torch.Tensor,
    max_whole_slices: int = ROI_MAX_WHOLE_SLICES,
    tile: Sequence[int] = ROI_PATCH_XYZ,
    pad_multiple: int = ROI_PAD_MULTIPLE,
    slice_dim: int = -1,
    autocast=None,
    mirror_axes: Sequence[int] = (),
) -> torch.Tensor:
    """Label map ``(B, 1, *spatial)`` uint8 (arg-max of :func:`roi_logits`); call with the network in eval mode."""
    with torch.no_grad():
        logits = roi_logits(network, x_sub, max_whole_slices, tile, pad_multiple, slice_dim, autocast, mirror_axes)
    if logits.shape[1] == 2:  # two classes: a comparison is cheaper than an arg-max
        return (logits[:, 1:2] > logits[:, 0:1]).to(torch.uint8)
    return logits.max(dim=1, keepdim=True).indices.to(torch.uint8)


class RoiInferer(Inferer):
    """MONAI inferer of the ROI bundle: :func:`roi_logits` (whole volume or tiles); keeps the input's meta data."""

    def __init__(
        self,
        max_whole_slices: int = ROI_MAX_WHOLE_SLICES,
        tile: Sequence[int] = ROI_PATCH_XYZ,
        pad_multiple: int = ROI_PAD_MULTIPLE,
        slice_dim: int = -1,
        mirror_axes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.max_whole_slices, self.tile, self.pad_multiple, self.slice_dim = (
            int(max_whole_slices),
            tuple(tile),
            int(pad_multiple),
            slice_dim,
        )
        _mirror_dims(mirror_axes)  # a bad value fails when the config is parsed, not at the first case
        self.mirror_axes = tuple(int(a) for a in mirror_axes)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        out = roi_logits(network, inputs, self.max_whole_slices, self.tile, self.pad_multiple, self.slice_dim,
                         mirror_axes=self.mirror_axes)  # fmt: skip
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
            out.is_batch = inputs.is_batch
        return out
