"""Transforms of the fine models: nnU-Net's CT normalisation with the dataset fingerprint; atomic saving.

:class:`CTNormalized` clips to the fingerprint's foreground percentiles and z-scores with its mean
and standard deviation in one pass (METHOD.md sections 2 and 4). It is what MONAI's
``ScaleIntensityRanged(a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True)`` followed by
``NormalizeIntensityd(subtrahend=mean, divisor=std)`` computes, in one component with one
allocation instead of two passes, and it keeps MONAI metadata (a ``MetaTensor`` stays one).

Bundle configs build it from ``flare23.io.read_fingerprint(@fingerprint_file, "organ"|"tumor")``
(``fingerprint_file`` empty: the defaults of METHOD.md):

    "normalization": "$flare23.io.read_fingerprint(@fingerprint_file, 'organ')",
    {"_target_": "flare23.transforms.CTNormalized", "keys": "image",
     "clip_low": "$@normalization['clip_low']", ...}

For ``SaveImaged``: :class:`AtomicNibabelWriter` (``"writer": "flare23.transforms.AtomicNibabelWriter"``)
writes each file to a temporary name beside it and renames it into place (``flare23.io.atomic_path``),
so an interrupted run never leaves a truncated NIfTI; :func:`case_name_formatter` names outputs by
case (``case_0001_0000.nii.gz`` -> ``case_0001.nii.gz``), the layout ``flare23 evaluate`` reads.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import NibabelWriter
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor

from flare23.errors import Flare23Error
from flare23.io import atomic_path, case_name, read_fingerprint

__all__ = ["AtomicNibabelWriter", "CTNormalize", "CTNormalized", "case_name_formatter"]


class CTNormalize(Transform):
    """``(clip(x, clip_low, clip_high) - mean) / std`` as float32 (array version)."""

    def __init__(self, clip_low: float, clip_high: float, mean: float, std: float, dtype=torch.float32) -> None:
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
