"""Evaluation of the ROI extractor: the share of each organ's voxels inside the predicted box (a MONAI transform and an ignite metric)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.transforms import Transform

from flare23.constants import (
    ORGAN_IDS,
)
from flare23.errors import Flare23Error
from flare23.roi.box import RoiBox, _where
from flare23.roi.geometry import _tensor


# --- evaluation: does the box hold the organs? ----------------------------------------------------
def box_coverage(box: RoiBox | Mapping | None, label) -> float:
    """Fraction of the organ voxels (ids 1..13) of a full-resolution ``label`` inside ``box`` (1.0 without organs)."""
    lab = _tensor(np.asarray(label))
    organs = (lab >= min(ORGAN_IDS)) & (lab <= max(ORGAN_IDS))
    total = int(organs.sum())
    if total == 0:
        return 1.0
    if isinstance(box, Mapping):
        box = None if box.get("empty") else RoiBox(tuple(box["start"]), tuple(box["stop"]), tuple(box["image_shape"]))
    if box is None:
        return 0.0
    if tuple(box.shape) != tuple(lab.shape):
        raise Flare23Error(f"box image shape {tuple(box.shape)} differs from the label shape {tuple(lab.shape)}")
    return int(organs[box.slices].sum()) / total


class RoiBoxCoveraged(Transform):
    """Post-processing for evaluation: ``data[output_key]`` = :func:`box_coverage` of ``data[box_key]`` (see
    :class:`RoiBoxd`) over the full-resolution label file that ``data[label_key]`` was read from."""

    def __init__(self, box_key: str = "roi_box", label_key: str = "label", output_key: str = "roi_box_coverage") -> None:
        self.box_key, self.label_key, self.output_key = box_key, label_key, output_key

    def __call__(self, data: Mapping) -> dict:
        from flare23.io import load_nifti

        d = dict(data)
        if self.box_key not in d:
            raise Flare23Error(f"RoiBoxCoveraged: no {self.box_key!r} in the data (put RoiBoxd before it)")
        label_file = _where(d.get(self.label_key))
        if label_file == "image":
            raise Flare23Error(f"RoiBoxCoveraged: {self.label_key!r} carries no source file name")
        label, _, _ = load_nifti(label_file)
        d[self.output_key] = torch.tensor(box_coverage(d[self.box_key], label), dtype=torch.float64)
        return d


class BoxCoverage(Metric):
    """Ignite metric: mean (``reduction="mean"``) or minimum (``"min"``) of per-case values (e.g. box coverage).

    ``output_transform`` must give a list of per-case numbers (``from_engine(['roi_box_coverage'])``).
    Reduced across processes under DDP.
    """

    def __init__(self, reduction: str = "mean", output_transform=lambda x: x, device="cpu") -> None:
        if reduction not in ("mean", "min"):
            raise Flare23Error(f"BoxCoverage: reduction must be 'mean' or 'min', got {reduction!r}")
        self.reduction = reduction
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.zeros((), dtype=torch.float64, device=self._device)
        self._count = torch.zeros((), dtype=torch.float64, device=self._device)
        self._min = torch.full((), float("inf"), dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output) -> None:
        values = output if isinstance(output, (list, tuple)) else [output]
        for v in values:
            v = float(torch.as_tensor(v).reshape(-1)[0]) if not isinstance(v, (int, float)) else float(v)
            self._sum += v
            self._count += 1
            self._min = torch.minimum(self._min, torch.tensor(v, dtype=torch.float64, device=self._device))

    @sync_all_reduce("_sum", "_count", "_min:MIN")
    def compute(self) -> float:
        if self._count.item() == 0:
            raise NotComputableError("BoxCoverage needs at least one case before compute()")
        return float(self._sum / self._count) if self.reduction == "mean" else float(self._min)
