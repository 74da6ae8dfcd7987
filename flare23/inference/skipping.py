"""Which sliding windows the cascade's networks need not run (issue 23, item 3).

Two rules, each an option of the pipeline bundle:

* **Air** (``skip_air_windows``): a window none of whose input voxels comes from the body is not run.
  The body is decided from HU on the crop grid, before any clipping or normalisation (a fingerprint's
  ``clip_low`` may lie above fat): ``HU > BODY_HU`` (-500). A window on the model grid reads, through
  the trilinear resampling of :func:`flare23.inference.cascade.prepare_branch_input`, exactly the crop
  voxels :func:`crop_box` returns; the window runs when one of them is body.
* **Tumor hosts** (``tumor_windows = "hosts"``): the tumor model runs only on windows whose crop
  voxels lie within ``margin_mm`` (per axis: a box-shaped dilation, :func:`margin_voxels`) of a voxel
  that the organ model labelled as a tumor-host organ (:data:`TUMOR_HOST_IDS`) or as tumor.

A skipped window contributes certain background (:func:`flare23.inference.sliding.sliding_window_slabs`'s
``skip_probs``), so only voxels that run windows do not cover become background by the rule; elsewhere
the run windows' answers are weighted as before, the skipped windows counting as background votes.

Decisions are made once per branch (:func:`window_plan`) from a boolean mask on the crop grid and the
windows' crop boxes: one ``any`` over each (expanded) box, on the mask's device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from flare23.constants import TUMOR_HOST_IDS, TUMOR_ID
from flare23.data.resample import linear_source_weights
from flare23.errors import Flare23Error
from flare23.inference.sliding import window_slices

#: HU above which a crop voxel is body (fat is about -100, lung about -850, air -1000).
BODY_HU = -500.0

#: ``tumor_windows`` values: run the tumor model on every window, or only near tumor-host organs.
TUMOR_WINDOW_MODES = ("all", "hosts")


def check_tumor_windows(value: str) -> str:
    value = str(value)
    if value not in TUMOR_WINDOW_MODES:
        raise Flare23Error(f"tumor_windows must be one of {', '.join(TUMOR_WINDOW_MODES)}, got {value!r}")
    return value


def check_margin(margin_mm) -> float:
    margin = float(margin_mm)
    if not math.isfinite(margin) or margin < 0:
        raise Flare23Error(f"tumor_host_margin_mm must be a finite number >= 0, got {margin_mm!r}")
    return margin


def crop_box(window: Sequence[slice], model_shape: Sequence[int], crop_shape: Sequence[int]) -> tuple[slice, slice, slice]:
    """The crop-grid voxels from which the model-grid voxels of ``window`` are interpolated.

    The model grid is the crop resampled to ``model_shape`` (:func:`flare23.data.resample.resample_image`,
    trilinear, ``align_corners=False``): model voxel ``j`` reads crop voxels ``i0[j]`` and, when its
    weight is not zero, ``i1[j]`` (:func:`flare23.data.resample.linear_source_weights`). Equal shapes
    (no resampling) read ``j`` itself.
    """
    out = []
    for w, m, n in zip(window, model_shape, crop_shape):
        a, b = int(w.start), int(w.stop)
        first, last = _source_range(int(n), int(m))
        out.append(slice(first[a], last[b - 1] + 1))
    return tuple(out)


@functools.lru_cache(maxsize=32)
def _source_range(n: int, m: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per model voxel (``m`` along the axis), the first and last crop voxel (``n``) its interpolation reads with a weight."""
    if m == n:
        return tuple(range(m)), tuple(range(m))
    i0, i1, w1 = linear_source_weights(n, m)
    return tuple(i0.tolist()), tuple(torch.where(w1 > 0, i1, i0).tolist())


def margin_voxels(margin_mm: float, spacing: Sequence[float]) -> tuple[int, ...]:
    """Voxels per axis within ``margin_mm`` of a voxel centre: ``floor(margin / spacing)`` (box-shaped dilation)."""
    return tuple(int(math.floor(float(margin_mm) / float(s) + 1e-6)) for s in spacing)


def _grow(box: Sequence[slice], grow: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(0, b.start - g), min(n, b.stop + g)) for b, g, n in zip(box, grow, shape))


def window_plan(
    mask: torch.Tensor,
    model_shape: Sequence[int],
    roi_size: Sequence[int],
    overlap: float,
    grow: Sequence[int] = (0, 0, 0),
) -> dict[tuple[int, int, int], bool]:
    """For every window of a branch (keyed by its start on the unpadded model grid): run it or not.

    A window runs when ``mask`` (bool, crop grid) has a true voxel in its crop box (:func:`crop_box`)
    grown by ``grow`` voxels per axis, i.e. when it touches ``mask`` dilated by that box.
    """
    crop_shape = tuple(int(s) for s in mask.shape)
    plan = {}
    for w in window_slices(model_shape, roi_size, overlap):
        box = _grow(crop_box(w, model_shape, crop_shape), grow, crop_shape)
        plan[window_key(w)] = bool(mask[box].any())
    return plan


def window_key(window: Sequence[slice]) -> tuple[int, int, int]:
    return tuple(int(w.start) for w in window)


def body_mask(crop_hu: torch.Tensor, threshold: float = BODY_HU) -> torch.Tensor:
    """``HU > threshold`` on the crop (bool, same device)."""
    return crop_hu > threshold


def host_mask(labels: torch.Tensor, host_ids: Sequence[int] = TUMOR_HOST_IDS) -> torch.Tensor:
    """Voxels of the organ model's labels (crop grid) that are a tumor-host organ or tumor (bool)."""
    ids = torch.tensor(sorted({int(v) for v in host_ids} | {TUMOR_ID}), dtype=labels.dtype, device=labels.device)
    return torch.isin(labels, ids)


class WindowCounter:
    """The ``run_window`` predicate of one branch: a precomputed plan (or run everything), counting what it decides."""

    def __init__(self, plan: dict | None = None):
        self.plan = plan
        self.run = self.skipped = 0

    def __call__(self, window: Sequence[slice]) -> bool:
        go = True if self.plan is None else self.plan[window_key(window)]
        if go:
            self.run += 1
        else:
            self.skipped += 1
        return go

    @property
    def skips(self) -> bool:
        return self.plan is not None and not all(self.plan.values())


def combine(*plans: dict | None) -> dict | None:
    """Windows that every given plan runs (``None``: no plan, everything runs)."""
    given = [p for p in plans if p is not None]
    if not given:
        return None
    return {k: all(p[k] for p in given) for k in given[0]}
