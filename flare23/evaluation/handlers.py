"""Ignite metrics for validation with the FLARE rules: mean organ / tumor DSC and NSD.

Use them in a bundle's ``validate#key_metric`` (or ``additional_metrics``); MONAI's
``CheckpointSaver(save_key_metric=True)`` then keeps the best checkpoint by them::

    "key_metric": {"val_mean_organ_dsc": {
        "_target_": "flare23.evaluation.handlers.FlareDSC",
        "label_ids": "$flare23.constants.ORGAN_IDS",
        "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}}

Input: ``(y_pred, y)``, each either a batched tensor ``(B, C, *spatial)`` or a list of per-sample
tensors ``(C, *spatial)`` (MONAI's decollated engine output). A sample with ``C == 1`` is a label
map; ``C > 1`` is one-hot or probabilities and is turned into a label map by argmax over the
channel axis. Per case and class the score follows :mod:`flare23.evaluation.metrics` exactly (empty-mask
rules; slab restriction of aorta, IVC and esophagus along the third spatial axis; for NSD the
class tolerance and the DSC cut-off). ``compute()`` returns the mean over ``label_ids`` of the
per-class means over cases; the per-class means are kept in ``per_class`` (label id -> value).

The sums of scores and the case count are reduced across processes (ignite's
``sync_all_reduce``), so the metrics are correct under DDP with a distributed sampler.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from flare23.constants import NSD_DSC_CUTOFF, ORGAN_IDS, SLAB_RESTRICTED_IDS
from flare23.errors import Flare23Error
from flare23.evaluation.metrics import evaluate_case

__all__ = ["FlareDSC", "FlareNSD", "samples_of", "to_label_map"]


def samples_of(x) -> list:
    """Split a batched tensor / array, or pass a list of samples through, as a list of samples."""
    if isinstance(x, (list, tuple)):
        return list(x)
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return [x[i] for i in range(x.shape[0])]
    raise Flare23Error(f"expected a batched tensor or a list of sample tensors, got {type(x).__name__}")


def to_label_map(sample) -> torch.Tensor:
    """``(1, *spatial)`` label map or ``(C, *spatial)`` one-hot / probabilities -> ``(*spatial)`` int64 labels."""
    t = _plain(torch.as_tensor(sample))
    if t.ndim < 2:
        raise Flare23Error(f"a sample must be (C, *spatial), got shape {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t[0]
        return t.round().long() if t.is_floating_point() else t.long()
    return t.argmax(dim=0)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else t


class _FlareMetric(Metric):
    """Mean over ``label_ids`` of per-class means over cases of a per-case score."""

    def __init__(
        self,
        label_ids: Iterable[int] = ORGAN_IDS,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
        slab_ids: Iterable[int] = SLAB_RESTRICTED_IDS,
    ):
        self.label_ids = tuple(int(c) for c in label_ids)
        if not self.label_ids or min(self.label_ids) < 1:
            raise Flare23Error(f"label_ids must be a non-empty list of labels >= 1, got {self.label_ids}")
        self.slab_ids = frozenset(int(c) for c in slab_ids)
        self.per_class: dict[int, float] = {}
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sums = torch.zeros(len(self.label_ids), dtype=torch.float64, device=self._device)
        self._num_cases = torch.zeros((), dtype=torch.float64, device=self._device)

    def _case_scores(self, pred: torch.Tensor, ref: torch.Tensor, sample_pred, sample_ref) -> torch.Tensor:
        raise NotImplementedError

    @reinit__is_reduced
    def update(self, output: Sequence) -> None:
        y_pred, y = output[0], output[1]
        preds, refs = samples_of(y_pred), samples_of(y)
        if len(preds) != len(refs):
            raise Flare23Error(f"{type(self).__name__}: {len(preds)} predictions for {len(refs)} labels")
        for sample_pred, sample_ref in zip(preds, refs):
            pred, ref = to_label_map(sample_pred), to_label_map(sample_ref)
            if pred.shape != ref.shape:
                raise Flare23Error(
                    f"{type(self).__name__}: prediction shape {tuple(pred.shape)} differs from label shape {tuple(ref.shape)}"
                )
            scores = self._case_scores(pred, ref.to(pred.device), sample_pred, sample_ref)
            self._sums += scores.to(device=self._device, dtype=torch.float64)
            self._num_cases += 1

    @sync_all_reduce("_sums", "_num_cases")
    def compute(self) -> float:
        if self._num_cases.item() == 0:
            raise NotComputableError(f"{type(self).__name__} needs at least one case before compute()")
        means = (self._sums / self._num_cases).cpu()
        self.per_class = {c: float(v) for c, v in zip(self.label_ids, means)}
        return float(means.mean())


class FlareDSC(_FlareMetric):
    """Mean FLARE DSC over ``label_ids`` (per class: mean over cases; both empty 1, one empty 0).

    Computed with one confusion-matrix ``bincount`` per case on the tensors' device; the slab
    classes (aorta, IVC, esophagus) are restricted to the reference's ``[z_min, z_max)`` along the
    third spatial axis, as :func:`flare23.evaluation.metrics.evaluate_case` does.
    """

    def _case_scores(self, pred, ref, sample_pred=None, sample_ref=None) -> torch.Tensor:
        k = max(self.label_ids) + 1  # values >= k (or < 0) fall into the extra bin k
        ref_c = torch.where((ref >= 0) & (ref < k), ref, k)
        pred_c = torch.where((pred >= 0) & (pred < k), pred, k)
        cm = torch.bincount((ref_c * (k + 1) + pred_c).reshape(-1), minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
        n_ref, n_pred, inter = cm.sum(1), cm.sum(0), cm.diagonal()
        scores = []
        for c in self.label_ids:
            g, p, i = int(n_ref[c]), int(n_pred[c]), int(inter[c])
            if g == 0 or p == 0:
                scores.append(1.0 if g == p else 0.0)
                continue
            if c in self.slab_ids and ref.ndim >= 3:
                g_mask = ref == c
                z = torch.nonzero(g_mask.movedim(2, 0).flatten(1).any(1)).flatten()
                lo, hi = int(z.min()), int(z.max())
                if hi <= lo:
                    scores.append(1.0)  # reference in one slice: empty slab (see flare23.evaluation.metrics)
                    continue
                g_s = g_mask.narrow(2, lo, hi - lo)
                p_s = (pred == c).narrow(2, lo, hi - lo)
                g, p, i = int(g_s.sum()), int(p_s.sum()), int((g_s & p_s).sum())
                if g == 0 or p == 0:
                    scores.append(1.0 if g == p else 0.0)
                    continue
            scores.append(2.0 * i / (g + p))
        return torch.tensor(scores, dtype=torch.float64)


def _spacing_of(*samples) -> tuple[float, ...] | None:
    """Voxel size from a MetaTensor's affine (MONAI's ``pixdim`` property), else ``None``."""
    for s in samples:
        pixdim = getattr(s, "pixdim", None)
        if pixdim is not None and not isinstance(pixdim, list):
            return tuple(float(v) for v in torch.as_tensor(pixdim).flatten()[:3])
    return None


class FlareNSD(_FlareMetric):
    """Mean FLARE NSD over ``label_ids``: class tolerances in mm, slab rule, DSC cut-off ``nsd_cutoff``.

    The voxel size comes from the label's (else the prediction's) MetaTensor affine; without
    metadata 1 mm is assumed, with a warning. Computed on the CPU with
    :func:`flare23.evaluation.metrics.evaluate_case`.
    """

    def __init__(
        self,
        label_ids: Iterable[int] = ORGAN_IDS,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
        nsd_cutoff: float = NSD_DSC_CUTOFF,
        slab_ids: Iterable[int] = SLAB_RESTRICTED_IDS,
    ):
        self.nsd_cutoff = float(nsd_cutoff)
        self._warned = False
        super().__init__(label_ids=label_ids, output_transform=output_transform, device=device, slab_ids=slab_ids)

    def _case_scores(self, pred, ref, sample_pred=None, sample_ref=None) -> torch.Tensor:
        if ref.ndim != 3:
            raise Flare23Error(f"FlareNSD needs 3D samples, got spatial shape {tuple(ref.shape)}")
        spacing = _spacing_of(sample_ref, sample_pred)
        if spacing is None:
            spacing = (1.0, 1.0, 1.0)
            if not self._warned:
                warnings.warn("FlareNSD: no MetaTensor spacing in the engine output, assuming 1 mm voxels", stacklevel=2)
                self._warned = True
        result = evaluate_case(
            ref.cpu().numpy(),
            pred.cpu().numpy(),
            spacing,
            labels=self.label_ids,
            nsd_cutoff=self.nsd_cutoff,
            slab_ids=self.slab_ids,
        )
        return torch.tensor([result[c][1] for c in self.label_ids], dtype=torch.float64)
