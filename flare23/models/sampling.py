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

Lesion-balanced centres (:class:`ClassComponentWeightsd` + ``weights_key``): MONAI centres a
class's patch on a voxel drawn uniformly among that class's voxels of the case, so among the
lesions of one case a lesion is drawn in proportion to its volume (the case itself is drawn
uniformly by the data loader, so a lesion alone in its case is unaffected; how much this changes
the patches is measured by ``bench/bench_lesion_exposure.py``). With weights from :class:`ClassComponentWeightsd` the sampler draws, for a balanced class, a
connected component (lesion) with probability proportional to ``size ** (1 - power)`` and then a
voxel of it uniformly (``power`` 1: every lesion equally often whatever its size; 0: MONAI's
voxel-uniform draw). MONAI has no weighted or per-component centre selection.

Ratio presets (lists of ``NUM_CLASSES`` numbers, index = label id) used by the bundle configs:
:func:`organ_ratios` and :func:`tumor_ratios`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandCropByLabelClassesd, Randomizable, SpatialCrop
from monai.transforms.utils import correct_crop_centers, generate_label_classes_crop_centers, map_classes_to_indices
from skimage.measure import label as connected_components

from flare23.constants import BACKGROUND, NUM_CLASSES, ORGAN_IDS, TUMOR_ID
from flare23.data.labels import bbox_with_physical_margins
from flare23.errors import Flare23Error

__all__ = [
    "ClassComponentWeightsd",
    "RandCropByLabelClassesFallbackd",
    "RandRoiContextCropd",
    "component_weights",
    "weighted_label_classes_crop_centers",
    "organ_ratios",
    "tumor_ratios",
    "effective_ratios",
]

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
    return _effective_ratios(ratios, class_sizes, fallback_ratios)[0]


def _effective_ratios(ratios, class_sizes, fallback_ratios=None) -> tuple[list[float], bool]:
    """:func:`effective_ratios` and whether they are the uniform-voxel fallback (voxel counts)."""
    sizes = np.asarray(class_sizes, dtype=np.float64)
    for candidate in (ratios, fallback_ratios):
        if candidate is None:
            continue
        r = np.where(sizes > 0, np.asarray(candidate, dtype=np.float64), 0.0)
        if r.sum() > 0:
            return r.tolist(), False
    if sizes.sum() <= 0:
        raise Flare23Error("patch selection: the label volume is empty")
    return sizes.tolist(), True


def _as_numpy(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)


def component_weights(label, flat_indices, class_id: int, power: float = 1.0, connectivity: int = 3) -> np.ndarray:
    """Sampling weights for the voxels ``flat_indices`` of class ``class_id`` in ``label`` (spatial array).

    Each voxel gets ``n ** -power``, ``n`` the number of listed voxels in its connected component of
    ``label == class_id`` (``connectivity`` 3: 26-neighbourhood, the FLARE lesion definition). With
    ``power`` 1 every component has the same total weight, so a component is drawn uniformly whatever
    its size. Counting the *listed* voxels (not the component's volume) keeps that exact when
    ``ClassesToIndicesd`` subsampled them (``max_samples_per_class``).
    """
    flat = _as_numpy(flat_indices).astype(np.int64, copy=False).ravel()
    if flat.size == 0:
        return np.zeros(0, np.float64)
    mask = _as_numpy(label) == class_id
    comps = connected_components(mask, connectivity=connectivity).ravel()[flat]
    if np.any(comps == 0):
        raise Flare23Error(f"lesion balance: some indices of class {class_id} are not voxels of that class")
    counts = np.bincount(comps)
    return counts[comps].astype(np.float64) ** -float(power)


class ClassComponentWeightsd(MapTransform):
    """Per-voxel sampling weights that balance the connected components (lesions) of some classes.

    Put it after ``ClassesToIndicesd`` (deterministic, so ``CacheDataset`` computes it once per case).
    It writes ``d[weights_key]``: a list with one entry per class, ``None`` for classes drawn as MONAI
    draws them (voxel-uniform) and, for each class of ``classes``, an array parallel to
    ``d[indices_key][class]`` from :func:`component_weights`. :class:`RandRoiContextCropd` and
    :class:`RandCropByLabelClassesFallbackd` take the same ``weights_key``. ``classes`` empty: the
    transform does nothing (the key is not written), so a config can keep it in place switched off.
    """

    def __init__(
        self,
        keys: KeysCollection,
        classes: Sequence[int] = (TUMOR_ID,),
        indices_key: str = "label_cls_indices",
        weights_key: str = "label_cls_weights",
        power: float = 1.0,
        connectivity: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.classes = [int(c) for c in (classes or [])]
        if any(c < 0 for c in self.classes):
            raise Flare23Error(f"lesion balance: class ids must be >= 0, got {self.classes}")
        if not (math.isfinite(float(power)) and 0.0 <= float(power) <= 1.0):
            raise Flare23Error(f"lesion balance: power must be in [0, 1], got {power}")
        if int(connectivity) not in (1, 2, 3):
            raise Flare23Error(f"lesion balance: connectivity must be 1, 2 or 3, got {connectivity}")
        self.indices_key, self.weights_key = indices_key, weights_key
        self.power, self.connectivity = float(power), int(connectivity)

    def __call__(self, data):
        d = dict(data)
        if not self.classes:
            return d
        for key in self.key_iterator(d):
            indices = d.get(self.indices_key)
            if indices is None:
                raise Flare23Error(f"lesion balance: no {self.indices_key!r}; put ClassesToIndicesd before this transform")
            if max(self.classes) >= len(indices):
                raise Flare23Error(f"lesion balance: class {max(self.classes)} not among the {len(indices)} classes")
            label = d[key]
            spatial = label[0] if label.ndim == 4 else label
            weights: list[np.ndarray | None] = [None] * len(indices)
            for c in self.classes:
                weights[c] = component_weights(spatial, indices[c], c, self.power, self.connectivity)
            d[self.weights_key] = weights
        return d


def weighted_label_classes_crop_centers(
    spatial_size, num_samples: int, label_spatial_shape, indices, weights, ratios, rand_state, allow_smaller=False
) -> list:
    """``generate_label_classes_crop_centers`` with optional per-voxel weights within a class.

    A class is drawn with ``ratios`` (already 0 for absent classes), then a voxel of it: uniformly
    where ``weights[c]`` is ``None`` (MONAI's draw, with the same random calls), else with probability
    proportional to ``weights[c]``; the centre is then moved inside the volume as MONAI does.
    """
    p = np.asarray(ratios, dtype=np.float64)
    classes = rand_state.choice(len(p), size=num_samples, p=p / p.sum())
    shape = tuple(int(n) for n in label_spatial_shape)
    centers = []
    for c in classes:
        pool = indices[c]
        w = None if weights is None else weights[c]
        if w is None:
            pick = rand_state.randint(len(pool))
        else:
            w = np.asarray(w, dtype=np.float64)
            pick = rand_state.choice(len(w), p=w / w.sum())
        center = np.unravel_index(int(_as_numpy(pool)[pick]), shape)
        centers.append(correct_crop_centers([int(v) for v in center], spatial_size, shape, allow_smaller))
    return tuple(centers)


class RandCropByLabelClassesFallbackd(RandCropByLabelClassesd):
    """``RandCropByLabelClassesd`` that never fails on cases lacking the configured classes.

    Same arguments as MONAI's transform (``ratios`` and ``num_classes`` required), plus
    ``fallback_ratios`` (``None``: straight to the uniform-voxel fallback) and ``weights_key``: where
    the data holds per-voxel weights from :class:`ClassComponentWeightsd` (lesion-balanced centres;
    ``None`` or a missing key: MONAI's voxel-uniform draw, identical random calls). ``last_ratios``
    holds the ratios used for the latest case (for tests and logging).
    """

    def __init__(
        self, keys, label_key, spatial_size, ratios, num_classes, fallback_ratios=None, weights_key=None, **kwargs
    ) -> None:
        kwargs.setdefault("warn", False)
        num_classes = int(num_classes)
        ratios = _check_ratios(ratios, num_classes, "ratios")
        self.fallback_ratios = _check_ratios(fallback_ratios, num_classes, "fallback_ratios")
        super().__init__(keys, label_key, spatial_size, ratios=ratios, num_classes=num_classes, **kwargs)
        self.weights_key = weights_key
        self._weights = None
        self.last_ratios: list[float] | None = None

    def __call__(self, data, lazy=None):
        d = dict(data)
        self._weights = d.pop(self.weights_key, None) if self.weights_key is not None else None
        try:
            return super().__call__(d, lazy=lazy)
        finally:
            self._weights = None

    def randomize(self, label, indices=None, image=None) -> None:
        cropper = self.cropper
        ref = label if label is not None else image
        if ref is None:
            raise Flare23Error("patch selection: neither a label nor an image to crop from")
        weights = self._weights
        if indices is None:
            if label is None:
                raise Flare23Error("patch selection: no label given")
            indices = map_classes_to_indices(
                label, cropper.num_classes, image, cropper.image_threshold, cropper.max_samples_per_class
            )
            weights = None  # weights are parallel to the cached indices only
        sizes = [len(ix) for ix in indices]
        ratios, uniform_voxel = _effective_ratios(cropper.ratios, sizes, self.fallback_ratios)
        if ratios != [r if s > 0 else 0.0 for r, s in zip(cropper.ratios, sizes)]:
            logger.debug("patch selection: no voxel of the configured classes, using fallback ratios %s", ratios)
        self.last_ratios = ratios
        shape = ref.peek_pending_shape() if hasattr(ref, "peek_pending_shape") else ref.shape[1:]
        if weights is None:
            cropper.centers = generate_label_classes_crop_centers(
                cropper.spatial_size, cropper.num_samples, shape, indices, ratios, cropper.R, cropper.allow_smaller, False
            )
            return
        if len(weights) != len(indices) or any(w is not None and len(w) != n for w, n in zip(weights, sizes)):
            raise Flare23Error("patch selection: the voxel weights do not match the class indices")
        if uniform_voxel:  # the uniform-voxel fallback stays uniform
            weights = None
        cropper.centers = weighted_label_classes_crop_centers(
            cropper.spatial_size, cropper.num_samples, shape, indices, weights, ratios, cropper.R, cropper.allow_smaller
        )


def _margin_range(name: str, value) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise Flare23Error(f"context margins: {name} must be a pair [low, high] of mm, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi < lo:
        raise Flare23Error(f"context margins: {name} must satisfy 0 <= low <= high, got [{lo}, {hi}]")
    return lo, hi


class RandRoiContextCropd(Randomizable, MapTransform):
    """Crop a training case to its labels' box widened by random physical margins: the ROI box's context.

    At inference the fine models see the ROI extractor's box (the abdomen's predicted extent widened by
    40 mm towards the feet, 20 mm towards the head, 5 mm in-plane; METHOD.md section 3), not the
    labels' box plus the fixed margin of the training crops. The ROI box is off by a few mm in-plane
    and by up to about 8 cm along the body axis (it often reaches far towards the feet), so a model
    trained only on tight crops meets unseen anatomy at the box's ends (a left adrenal "found" in the
    pelvis, which keep-largest-component then keeps instead of the real one) and organs touching a
    box side. This transform shows the network that variety: with probability ``prob`` it draws, for
    each side, a margin uniformly in ``margins_mm[direction]`` = ``[low, high]`` mm (directions
    ``feet``, ``head``, ``inplane``; physical, converted with the image's affine exactly as the ROI
    box does, :func:`flare23.data.labels.bbox_with_physical_margins`), and crops every key to the box of
    ``label_key > 0`` widened by them (clamped to the volume). The context can only be as large as
    the training volume: train on uncropped scans, or on crops whose margin is at least ``high``.

    ``min_size``: the box is grown (around its centre, within the volume) to at least this size,
    e.g. the patch size, so that no padding is needed after it. ``indices_key``: per-class flat voxel
    indices from ``ClassesToIndicesd`` (cached before this transform) are mapped into the box, so
    that the class indices need not be recomputed over the volume for every sample (the box holds
    all the foreground, so only background indices can drop out). ``weights_key``: per-voxel weights
    parallel to those indices (:class:`ClassComponentWeightsd`) are filtered with them.

    MONAI's ``RandSpatialCropd`` / ``RandCropByLabelClassesd`` draw patches, not a box around the
    foreground with per-side physical margins, hence this component. A case with an empty label is
    returned unchanged. The crop is a MONAI ``SpatialCrop`` (metadata and affine follow).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        margins_mm: Mapping[str, Sequence[float]] | None = None,
        prob: float = 1.0,
        min_size: Sequence[int] | None = None,
        indices_key: str | None = None,
        weights_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.weights_key = weights_key
        self.label_key = label_key
        self.min_size = None if min_size is None else tuple(int(v) for v in min_size)
        self.indices_key = indices_key
        margins = dict(margins_mm or {})
        unknown = set(margins) - {"feet", "head", "inplane"}
        if unknown:
            raise Flare23Error(f"context margins: unknown direction(s) {sorted(unknown)}; expected feet, head, inplane")
        self.margins = {k: _margin_range(k, margins.get(k, (0.0, 0.0))) for k in ("feet", "head", "inplane")}
        if not 0.0 <= float(prob) <= 1.0:
            raise Flare23Error(f"context margins: prob must be in [0, 1], got {prob}")
        self.prob = float(prob)
        self.last_box: tuple[slice, ...] | None = None

    def _draw(self) -> dict[str, float]:
        return {k: float(self.R.uniform(lo, hi)) for k, (lo, hi) in self.margins.items()}

    def randomize(self, data=None) -> None:
        self._do = self.R.rand() < self.prob
        # two independent draws: one for the sides below (lower array index), one for those above
        self._below, self._above = self._draw(), self._draw()

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        self.last_box = None
        if not self._do:
            return d
        label = d[self.label_key]
        fg = np.asarray((torch.as_tensor(label)[0] if label.ndim == 4 else torch.as_tensor(label)).cpu()) > 0
        affine = label.affine if isinstance(label, MetaTensor) else torch.eye(4, dtype=torch.float64)
        affine = np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu())
        box = bbox_with_physical_margins(fg, affine, self._below, self._above)
        if box is None:
            return d
        shape = tuple(int(n) for n in fg.shape)
        start, stop = [b.start for b in box], [b.stop for b in box]
        if self.min_size is not None:
            for i, want in enumerate(self.min_size[:3]):
                grow = min(want, shape[i]) - (stop[i] - start[i])
                if grow > 0:  # grow around the centre, then shift back inside the volume
                    start[i] -= grow // 2
                    stop[i] += grow - grow // 2
                    shift = max(0, -start[i]) - max(0, stop[i] - shape[i])
                    start[i], stop[i] = start[i] + shift, stop[i] + shift
        box = tuple(slice(a, b) for a, b in zip(start, stop))
        self.last_box = box
        crop = SpatialCrop(roi_slices=box)
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        if self.indices_key is not None and d.get(self.indices_key) is not None:
            indices = d[self.indices_key]
            weights = d.get(self.weights_key) if self.weights_key is not None else None
            if weights is None:
                d[self.indices_key] = [_indices_in_box(ix, shape, box) for ix in indices]
            else:
                pairs = [
                    _indices_in_box(ix, shape, box, w) if w is not None else (_indices_in_box(ix, shape, box), None)
                    for ix, w in zip(indices, weights)
                ]
                d[self.indices_key] = [ix for ix, _ in pairs]
                d[self.weights_key] = [w for _, w in pairs]
        return d


def _indices_in_box(flat, shape: Sequence[int], box: Sequence[slice], weights=None):
    """Flat indices into ``shape`` -> flat indices into the sub-volume ``box`` (those inside it).

    With ``weights`` (an array parallel to ``flat``, or ``None``) returns ``(indices, weights)``, the
    weights of the kept voxels.
    """
    arr = np.asarray(flat.cpu() if isinstance(flat, torch.Tensor) else flat).astype(np.int64, copy=False).ravel()
    coords = np.unravel_index(arr, tuple(shape))
    inside = np.ones(arr.shape, bool)
    for c, b in zip(coords, box):
        inside &= (c >= b.start) & (c < b.stop)
    sub = tuple(c[inside] - b.start for c, b in zip(coords, box))
    out = np.ravel_multi_index(sub, tuple(b.stop - b.start for b in box)) if arr.size else arr
    out = torch.as_tensor(out) if isinstance(flat, torch.Tensor) else out
    if weights is None:
        return out
    return out, np.asarray(weights)[inside]
