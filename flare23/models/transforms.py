"""Transforms of the fine models: nnU-Net's CT normalisation with the dataset fingerprint; atomic saving.

:class:`CTNormalized` clips to the fingerprint's foreground percentiles and z-scores with its mean
and standard deviation in one pass (METHOD.md sections 2 and 4). It is what MONAI's
``ScaleIntensityRanged(a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True)`` followed by
``NormalizeIntensityd(subtrahend=mean, divisor=std)`` computes, in one component with one
allocation instead of two passes, and it keeps MONAI metadata (a ``MetaTensor`` stays one).

Bundle configs build it from ``flare23.io.read_fingerprint(@fingerprint_file, "organ"|"tumor")``
(``fingerprint_file`` empty: the defaults of METHOD.md):

    "normalization": "$flare23.io.read_fingerprint(@fingerprint_file, 'organ')",
    {"_target_": "flare23.models.transforms.CTNormalized", "keys": "image",
     "clip_low": "$@normalization['clip_low']", ...}

For ``SaveImaged``: :class:`AtomicNibabelWriter` (``"writer": "flare23.models.transforms.AtomicNibabelWriter"``)
writes each file to a temporary name beside it and renames it into place (``flare23.io.atomic_path``),
so an interrupted run never leaves a truncated NIfTI; :func:`case_name_formatter` names outputs by
case (``case_0001_0000.nii.gz`` -> ``case_0001.nii.gz``), the layout ``flare23 evaluate`` reads.

:class:`RandElastic3Dd` is the training configs' elastic deformation (nnU-Net's: sigma 9-13 voxels,
magnitude 0-900), used instead of MONAI's ``Rand3DElasticd`` for two reasons measured on a 96 x 96 x 48
patch (``bench/bench_elastic.py``): MONAI 1.6.1 resamples every key through an identity grid when the
draw says "do not deform" (80 % of the calls at ``prob`` 0.2; about 100 ms a patch on the GPU machine's
cores, which starved a GPU training of data), and it smooths a full-resolution noise field with a
Gaussian of 55-79 taps per axis (about 1 s a deformed patch). This one returns the data untouched when
it does not deform, and smooths the noise on a grid ``f = sigma // 3`` times coarser, divides it by
``f ** 1.5`` (smoothing coarse noise leaves ``f ** 1.5`` times the standard deviation that smoothing
the full-resolution noise leaves) and upsamples it trilinearly: the same displacement statistics
(``tests/test_transforms.py``: standard deviation within 15 %, same correlation length), for a
fraction of the cost.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import NibabelWriter
from monai.networks.layers import GaussianFilter
from monai.transforms import MapTransform, RandomizableTransform, Resample, Transform
from monai.transforms.utils import create_grid
from monai.utils import convert_to_tensor, ensure_tuple_rep

from flare23.errors import Flare23Error
from flare23.io import atomic_path, case_name, read_fingerprint

__all__ = ["AtomicNibabelWriter", "CTNormalize", "CTNormalized", "RandElastic3Dd", "case_name_formatter"]


class CTNormalize(Transform):
    """``(clip(x, clip_low, clip_high) - mean) / std`` as float32 (array version).

    ``inplace=True`` overwrites a float32 tensor given to it instead of allocating a copy (the cascade
    does so on the model-grid volume it has just made: one volume less at the peak).
    """

    def __init__(
        self, clip_low: float, clip_high: float, mean: float, std: float, dtype=torch.float32, inplace: bool = False
    ) -> None:
        values = {"clip_low": clip_low, "clip_high": clip_high, "mean": mean, "std": std}
        for name, value in values.items():
            if value is None or not math.isfinite(float(value)):
                raise Flare23Error(f"CT normalisation: {name} must be a finite number, got {value!r}")
        if float(clip_low) >= float(clip_high):
            raise Flare23Error(f"CT normalisation: clip_low {clip_low} must be below clip_high {clip_high}")
        if float(std) <= 0:
            raise Flare23Error(f"CT normalisation: std must be positive, got {std}")
        self.clip_low = float(clip_low)
        self.clip_high = float(clip_high)
        self.mean = float(mean)
        self.std = float(std)
        self.dtype = dtype
        self.inplace = bool(inplace)

    @classmethod
    def from_fingerprint(cls, path: str | None, model: str = "organ", **kwargs) -> CTNormalize:
        return cls(**read_fingerprint(path, model), **kwargs)

    def __call__(self, img):
        if isinstance(img, np.ndarray):
            out = np.clip(img.astype(np.float32, copy=True), self.clip_low, self.clip_high)
            out -= np.float32(self.mean)
            out /= np.float32(self.std)
            return out
        t = convert_to_tensor(img, track_meta=True)
        if self.inplace and t.dtype == self.dtype:
            return t.clamp_(self.clip_low, self.clip_high).sub_(self.mean).div_(self.std)
        out = t.to(self.dtype).clamp(self.clip_low, self.clip_high)  # clamp allocates: the input is never changed
        return out.sub_(self.mean).div_(self.std)


class CTNormalized(MapTransform):
    """Dictionary version of :class:`CTNormalize` (usually ``keys="image"``)."""

    backend = [torch.Tensor, np.ndarray]

    def __init__(
        self,
        keys: KeysCollection,
        clip_low: float,
        clip_high: float,
        mean: float,
        std: float,
        dtype=torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = CTNormalize(clip_low, clip_high, mean, std, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key])
        return d


class RandElastic3Dd(RandomizableTransform, MapTransform):
    """Random 3D elastic deformation of ``keys`` (channel-first, three spatial dims), one field for all keys.

    The displacement (in voxels) is uniform noise in [-1, 1] per voxel and axis, smoothed by a Gaussian of
    ``sigma`` voxels (drawn from ``sigma_range``) and multiplied by ``magnitude`` (from ``magnitude_range``):
    the meaning of MONAI's ``Rand3DElasticd`` and nnU-Net's ``elastic_deform_alpha`` / ``sigma``. Unlike
    MONAI's, a call that does not deform returns the input unchanged (MONAI resamples through an identity
    grid), and the noise is smoothed on a grid ``coarse_factor`` (default ``sigma // 3``, at least 1) times
    coarser, then divided by ``coarse_factor ** 1.5`` and upsampled trilinearly (module docstring: why).
    ``mode`` / ``padding_mode``: one per key or one for all, as in MONAI's ``Resample``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        sigma_range: tuple[float, float],
        magnitude_range: tuple[float, float],
        prob: float = 0.1,
        mode="bilinear",
        padding_mode="zeros",
        coarse_factor: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        lo, hi = (float(v) for v in sigma_range)
        if not 0 < lo <= hi:
            raise Flare23Error(f"RandElastic3Dd: sigma_range must be 0 < low <= high, got {sigma_range}")
        mlo, mhi = (float(v) for v in magnitude_range)
        if not 0 <= mlo <= mhi:
            raise Flare23Error(f"RandElastic3Dd: magnitude_range must be 0 <= low <= high, got {magnitude_range}")
        if coarse_factor is not None and int(coarse_factor) < 1:
            raise Flare23Error(f"RandElastic3Dd: coarse_factor must be >= 1, got {coarse_factor}")
        self.sigma_range, self.magnitude_range = (lo, hi), (mlo, mhi)
        self.coarse_factor = None if coarse_factor is None else int(coarse_factor)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))
        self.resampler = Resample()
        self.sigma = self.magnitude = 0.0
        self.factor = 1
        self.noise: np.ndarray | None = None

    def randomize(self, spatial_size) -> None:  # type: ignore[override]
        super().randomize(None)
        if not self._do_transform:
            return
        self.sigma = float(self.R.uniform(*self.sigma_range))
        self.magnitude = float(self.R.uniform(*self.magnitude_range))
        self.factor = self.coarse_factor or max(1, int(self.sigma // 3))
        coarse = [max(2, math.ceil((int(s) - 1) / self.factor) + 1) for s in spatial_size]
        self.noise = self.R.uniform(-1.0, 1.0, [3, *coarse]).astype(np.float32)

    def displacement(self, spatial_size, device=None) -> torch.Tensor:
        """The drawn displacement field, ``(3, *spatial_size)`` voxels (call after :meth:`randomize`)."""
        f = self.factor
        noise = torch.as_tensor(self.noise, device=device)[None]
        smooth = GaussianFilter(spatial_dims=3, sigma=self.sigma / f, truncated=3.0).to(device)(noise)
        if f > 1:
            smooth = torch.nn.functional.interpolate(
                smooth, size=tuple(int(s) for s in spatial_size), mode="trilinear", align_corners=True
            )
        return smooth[0] * (self.magnitude / f**1.5)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        size = d[first].shape[1:]
        if len(size) != 3:
            raise Flare23Error(f"RandElastic3Dd: expects channel-first 3D data, key {first!r} has shape {tuple(d[first].shape)}")
        self.randomize(size)
        if not self._do_transform:
            return d
        device = d[first].device if isinstance(d[first], torch.Tensor) else None
        grid = create_grid(spatial_size=size, device=device, backend="torch", dtype=torch.float32)
        grid[:3] += self.displacement(size, device)
        for key, mode, padding_mode in self.key_iterator(d, self.mode, self.padding_mode):
            d[key] = self.resampler(d[key], grid, mode=mode, padding_mode=padding_mode)
        return d


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing through a temporary file renamed into place."""

    def write(self, filename, verbose: bool = False, **obj_kwargs):
        path = Path(filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            super().write(str(tmp), verbose=verbose, **obj_kwargs)


def case_name_formatter(metadict: dict | None, saver=None) -> dict:
    """``SaveImaged`` ``output_name_formatter``: the case id of the source file as the output name."""
    source = (metadict or {}).get("filename_or_obj")
    if not source:
        index = getattr(saver, "_data_index", 0)
        return {"subject": f"case_{index}", "idx": None}
    return {"subject": case_name(str(source)), "idx": (metadict or {}).get("patch_index")}
