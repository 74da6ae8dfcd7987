"""The one resampling convention of the project: training, each bundle's inference and the cascade.

**Convention (nnU-Net's).** A volume of ``n`` voxels of spacing ``s`` along an axis goes to ``m =
round(n * s / t)`` voxels for a target spacing ``t``, and the two grids share their *outer edges*:
output voxel ``j`` is centred on input position ``(j + 0.5) * n / m - 0.5`` (``F.interpolate`` with
``align_corners=False``; images trilinear, labels nearest, ``nearest-exact``). This is what nnU-Net
does (``skimage.transform.resize`` to ``round(shape * spacing / target)``), the method's reference; the
output spacing is ``s * n / m``, within half a voxel of ``t`` over the volume. MONAI's ``Spacingd``
instead keeps ``t`` exactly and aligns the *first voxel centres*, which shifts the model grid by up to
``0.5 * (t - s)`` against this one (1.5 mm in z for the tumor model on 1 mm slices). The cascade has
always resampled on the device this way (:func:`flare23.data.resample.resample_image`, and
:class:`flare23.data.resample.StreamingLabels` back to the crop grid), so training and the bundles' own
inference use it too (:class:`ResampleToSpacingd`, invertible for ``Invertd``), and a network sees the
same grid in all three (``tests/test_one_definition.py``).

**Target shapes** (:func:`target_shape`) are computed from spacings rounded to 1e-5 mm: a NIfTI header
stores float32 spacings, a DICOM series decimal strings read as float64, and ``n * s / t`` on an exact
half (a 0.8203125 mm pixel against 0.82 in DICOM) must not round to different shapes for the same scan.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.utils import ensure_tuple_rep

from flare23.data.resample import resample_image
from flare23.errors import Flare23Error
from flare23.io import voxel_spacing

__all__ = ["ResampleToSpacing", "ResampleToSpacingd", "resampled_affine", "target_shape"]

_MODES = {"bilinear": "trilinear", "trilinear": "trilinear", "nearest": "nearest-exact", "nearest-exact": "nearest-exact"}


def target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """``round(n * s / t)`` per axis (at least 1; halves to even, as ``np.round`` in nnU-Net), from spacings rounded to 1e-5 mm."""
    if len(shape) != len(spacing) or len(shape) != len(target):
        raise Flare23Error(f"target_shape: shape {tuple(shape)}, spacing {tuple(spacing)} and target {tuple(target)} differ in length")
    if min(float(t) for t in target) <= 0:
        raise Flare23Error(f"target spacing must be positive, got {tuple(target)}")
    return tuple(
        max(1, int(np.round(int(n) * round(float(s), 5) / round(float(t), 5)))) for n, s, t in zip(shape, spacing, target)
    )


def resampled_affine(affine: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
    """The affine of the resampled grid: voxel ``j`` at input position ``(j + 0.5) * n / m - 0.5``."""
    affine = np.asarray(affine, dtype=np.float64)
    scale = np.array([n / m for n, m in zip(in_shape, out_shape)], dtype=np.float64)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = 0.5 * scale - 0.5
    return affine @ step


class ResampleToSpacing(InvertibleTransform):
    """Resample a channel-first ``MetaTensor`` to ``pixdim`` with the project's convention; invertible.

    ``mode``: ``"bilinear"`` / ``"trilinear"`` (images, class probabilities) or ``"nearest"`` (labels,
    ``nearest-exact``: the centre-mapped nearest voxel). The output is float32 for images and keeps the
    input's dtype for labels; its affine is :func:`resampled_affine`. ``inverse`` resamples back to the
    input's shape with the same convention (``Invertd`` uses it: probabilities trilinearly, as the
    cascade does).
    """

    def __init__(self, pixdim: Sequence[float], mode: str = "bilinear") -> None:
        if mode not in _MODES:
            raise Flare23Error(f"ResampleToSpacing: mode must be one of {', '.join(_MODES)}, got {mode!r}")
        self.pixdim = tuple(float(p) for p in pixdim)
        self.mode = _MODES[mode]

    @staticmethod
    def _resample(img: torch.Tensor, shape: Sequence[int], mode: str) -> torch.Tensor:
        data = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        if tuple(data.shape[1:]) == tuple(shape):
            return data.clone()
        channels = [resample_image(c, shape, mode) for c in data]
        out = torch.stack(channels)
        return out.to(data.dtype) if mode != "trilinear" else out

    def __call__(self, img: torch.Tensor) -> MetaTensor:
        if img.ndim != 4:
            raise Flare23Error(f"ResampleToSpacing: expected a channel-first 3D image, got shape {tuple(img.shape)}")
        if not isinstance(img, MetaTensor):
            img = MetaTensor(img)
        affine = np.asarray(img.affine.detach().cpu().numpy(), dtype=np.float64)
        in_shape = tuple(int(s) for s in img.shape[1:])
        out_shape = target_shape(in_shape, voxel_spacing(affine), self.pixdim)
        out = MetaTensor(self._resample(img, out_shape, self.mode), meta=dict(img.meta), applied_operations=list(img.applied_operations))
        out.affine = torch.as_tensor(resampled_affine(affine, in_shape, out_shape), dtype=torch.float64)
        self.push_transform(out, orig_size=in_shape, extra_info={"affine": affine.tolist(), "mode": self.mode})
        return out

    def inverse(self, data: torch.Tensor) -> MetaTensor:
        transform = self.pop_transform(data)
        in_shape = tuple(int(s) for s in transform["orig_size"])
        mode = _MODES.get(transform["extra_info"]["mode"], transform["extra_info"]["mode"])  # Invertd(nearest_interp) sets "nearest"
        back = self._resample(data, in_shape, mode)
        out = MetaTensor(back, meta=dict(data.meta), applied_operations=list(data.applied_operations))
        out.affine = torch.as_tensor(np.asarray(transform["extra_info"]["affine"]), dtype=torch.float64)
        return out


class ResampleToSpacingd(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`ResampleToSpacing`; ``mode`` one per key or one for all."""

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float], mode="bilinear", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        modes = ensure_tuple_rep(mode, len(self.keys))
        self.resamplers = {key: ResampleToSpacing(pixdim, m) for key, m in zip(self.keys, modes)}

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resamplers[key](d[key])
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resamplers[key].inverse(d[key])
        return d
