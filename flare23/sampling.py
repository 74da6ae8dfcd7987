"""Class-centred patch selection for the fine models (METHOD.md section 4, issue item 4).

The paper draws a class among those the model focuses on, then a patch centred on a voxel of that
class. MONAI's ``RandCropByLabelClassesd`` does exactly this with per-class ``ratios``; when a class
is absent from a case it sets that class's ratio to 0 and renormalises the others, which keeps the
*relative* shares of the present classes (no bias among them). What it does not handle is a case in
which *every* class with a positive ratio is absent (e.g. the tumor-only ratios of fine-tuning on a
case without tumor, or an empty label): the probabilities become 0/0 and ``numpy`` raises.

:class:`RandCropByLabelClassesFallbackd` adds that case: it uses ``fallback_ratios`` (e.g. organ
classes uniformly) when no class of ``ratios`` is present, and, when none of those is present
either, a voxel drawn uniformly from the whole volume (an unbiased random crop). It also silences
MONAI's per-call warning about absent classes, which the fallback makes expected.

Ratio presets (lists of ``NUM_CLASSES`` numbers, index = label id) used by the bundle configs:
:func:`organ_ratios` and :func:`tumor_ratios`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from monai.transforms import RandCropByLabelClassesd
from monai.transforms.utils import generate_label_classes_crop_centers, map_classes_to_indices

from flare23.constants import BACKGROUND, NUM_CLASSES, ORGAN_IDS, TUMOR_ID
from flare23.errors import Flare23Error

__all__ = ["RandCropByLabelClassesFallbackd", "organ_ratios", "tumor_ratios", "effective_ratios"]

logger = logging.getLogger(__name__)


def organ_ratios(background: float = 0.0, organ: float = 1.0, tumor: float = 0.0) -> list[float]:
    """Organ-centred: every organ class drawn with the same weight (default: organs only)."""
    ratios = [0.0] * NUM_CLASSES
    ratios[BACKGROUND] = float(background)
    for i in ORGAN_IDS:
        ratios[i] = float(organ)
    ratios[TUMOR_ID] = float(tumor)
    return ratios


def tumor_ratios(tumor: float = 1.0, organ: float = 0.0, background: float = 0.0) -> list[float]:
    """Tumor-centred: ``tumor`` for label 14, ``organ`` for each organ class (default: tumor only)."""
    return organ_ratios(background=background, organ=organ, tumor=tumor)


def _check_ratios(ratios: Sequence[float] | None, num_classes: int, name: str) -> list[float] | None:
    if ratios is None:
        return None
    values = [float(r) for r in ratios]
    if len(values) != num_classes:
        raise Flare23Error(f"{name}: expected {num_classes} ratios (one per class), got {len(values)}")
    if any(not np.isfinite(r) or r < 0 for r in values):
        raise Flare23Error(f"{name}: ratios must be finite and >= 0, got {values}")
    if sum(values) <= 0:
        raise Flare23Error(f"{name}: at least one ratio must be positive, got {values}")
    return values


def effective_ratios(
    ratios: Sequence[float], class_sizes: Sequence[int], fallback_ratios: Sequence[float] | None = None
) -> list[float]:
    """Ratios actually used for a case whose classes have ``class_sizes`` voxels.

    Absent classes get 0; if nothing of ``ratios`` is left, ``fallback_ratios`` is used the same way;
    if nothing is left either, each class gets its voxel count (= a uniformly drawn voxel).
    """
    sizes = np.asarray(class_sizes, dtype=np.float64)
    for candidate in (ratios, fallback_ratios):
        if candidate is None:
            continue
        r = np.where(sizes > 0, np.asarray(candidate, dtype=np.float64), 0.0)
        if r.sum() > 0:
            return r.tolist()
    if sizes.sum() <= 0:
        raise Flare23Error("patch selection: the label volume is empty")
    return sizes.tolist()


class RandCropByLabelClassesFallbackd(RandCropByLabelClassesd):
    """``RandCropByLabelClassesd`` that never fails on cases lacking the configured classes.

    Same arguments as MONAI's transform (``ratios`` and ``num_classes`` required), plus
    ``fallback_ratios`` (``None``: straight to the uniform-voxel fallback). ``last_ratios`` holds the
    ratios used for the latest case (for tests and logging).
    """

    def __init__(self, keys, label_key, spatial_size, ratios, num_classes, fallback_ratios=None, **kwargs) -> None:
        kwargs.setdefault("warn", False)
        num_classes = int(num_classes)
        ratios = _check_ratios(ratios, num_classes, "ratios")
        self.fallback_ratios = _check_ratios(fallback_ratios, num_classes, "fallback_ratios")
        super().__init__(keys, label_key, spatial_size, ratios=ratios, num_classes=num_classes, **kwargs)
        self.last_ratios: list[float] | None = None

    def randomize(self, label, indices=None, image=None) -> None:
        cropper = self.cropper
        ref = label if label is not None else image
        if ref is None:
            raise Flare23Error("patch selection: neither a label nor an image to crop from")
        if indices is None:
            if label is None:
                raise Flare23Error("patch selection: no label given")
            indices = map_classes_to_indices(
                label, cropper.num_classes, image, cropper.image_threshold, cropper.max_samples_per_class
            )
        sizes = [len(ix) for ix in indices]
        ratios = effective_ratios(cropper.ratios, sizes, self.fallback_ratios)
        if ratios != [r if s > 0 else 0.0 for r, s in zip(cropper.ratios, sizes)]:
            logger.debug("patch selection: no voxel of the configured classes, using fallback ratios %s", ratios)
        self.last_ratios = ratios
        shape = ref.peek_pending_shape() if hasattr(ref, "peek_pending_shape") else ref.shape[1:]
        cropper.centers = generate_label_classes_crop_centers(
            cropper.spatial_size, cropper.num_samples, shape, indices, ratios, cropper.R, cropper.allow_smaller, False
        )
