"""FLARE 2023 segmentation metrics: DSC and normalised surface Dice (NSD), exact to the challenge's rules.

Per case and class (METHOD.md section 6), on the original grid with the header spacing:

* DSC = 2 |G and P| / (|G| + |P|).
* NSD = surface Dice at the class tolerance ``NSD_TOLERANCE_MM`` (mm), computed from surface
  elements (surfels) with areas, as DeepMind's ``surface-distance`` package does
  (``compute_surface_distances`` + ``compute_surface_dice_at_tolerance``): a surfel of one surface
  counts when its distance to the other surface is ``<= tolerance``.
* G and P both empty: DSC = NSD = 1; exactly one empty: DSC = NSD = 0 (decided on the whole masks).
* Aorta, IVC, esophagus (``SLAB_RESTRICTED_IDS``): both masks are restricted to the slab of G along
  the array's THIRD axis, ``[z_min, z_max)`` (upper bound exclusive), as the organisers' code does on
  nibabel arrays (``np.where(gt)[2]``). For a RAS or LPS NIfTI this is the inferior-superior axis;
  for any other orientation it is still the third array axis, exactly like the challenge's code.
  **Decision** for the corner case that the organisers' code leaves undefined (it returns NaN): when
  G lies in a single slice the slab is empty, both restricted masks are empty, and the empty-mask
  rule gives DSC = NSD = 1.
* DSC < ``nsd_cutoff`` (default ``NSD_DSC_CUTOFF`` = 0.1; the organisers' current code uses 0.2): NSD = 0.

Implementation (our own code, same numbers as ``surface-distance``):

* one :func:`scipy.ndimage.find_objects` pass per label map gives every class's bounding box, so each
  class is cropped to the box of (G or P) before any per-voxel work; nothing per class touches the
  whole volume;
* the 2 x 2 x 2 neighbourhood code of every voxel corner is built with three shift-and-or passes on
  the cropped mask, padded by one background voxel on every side (the image is taken to be
  surrounded by background, as in ``surface-distance``); the corners form the same grid as DeepMind's;
* the surfel area of each of the 256 codes is the area of the marching-cubes surface (level 0.5,
  scikit-image, Lorensen's table) inside one cell scaled by the spacing; configurations with more
  than four inside corners use their complement, which makes the table symmetric like DeepMind's.
  ``tests/test_metrics.py`` checks all 256 entries against ``surface-distance``'s table;
* distances are :func:`scipy.ndimage.distance_transform_edt` with ``sampling=spacing`` on the corner
  grid, exact Euclidean distances in mm (the same grid and call as ``surface-distance``, hence the
  same distances); no sorting is needed (``surface-distance`` sorts every surfel in Python) and no
  per-class full-volume pass is made.

Why not MONAI's ``SurfaceDiceMetric``: checked with ``use_subvoxels=True`` and ``spacing``; it is
surfel based too but agrees only to about 1e-7, not to the last digit (its surfel areas are
float32), it implements none of the FLARE rules (empty masks, slab, cut-off), and it takes one-hot
tensors (15 float32 channels of a 512 x 512 x 300 CT are 4.7 GB). Timed on the same per-class crops
(``bench/bench_evaluate.py --monai``), its NSD alone was no faster than this module's whole
``evaluate_case`` (DSC and NSD of 14 classes). The tests compare against the independent
``surface-distance`` package instead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from flare23.constants import (
    FOREGROUND_IDS,
    LABEL_KEYS,
    NSD_DSC_CUTOFF,
    NSD_TOLERANCE_MM,
    ORGAN_IDS,
    SLAB_RESTRICTED_IDS,
    TUMOR_ID,
)
from flare23.data.boxes import mask_box
from flare23.errors import Flare23Error

__all__ = [
    "dice",
    "normalized_surface_dice",
    "evaluate_case",
    "aggregate",
    "surfel_area_table",
    "surface_distances",
]


# --- surfel areas ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _unit_cell_triangles() -> tuple[np.ndarray, ...]:
    """Marching-cubes triangles (unit spacing) of each of the 256 corner configurations of one cell.

    Code bit ``4a + 2b + c`` is the corner ``(a, b, c)`` of the cell (0 or 1 along each axis).
    """
    from skimage.measure import marching_cubes

    triangles = []
    for code in range(256):
        cell = np.array([(code >> bit) & 1 for bit in range(8)], dtype=bool).reshape(2, 2, 2)
        n = int(cell.sum())
        if n in (0, 8):
            triangles.append(np.zeros((0, 3, 3)))
            continue
        if n > 4:  # same surface as the complement; Lorensen's table is not symmetric for these
            cell = ~cell
        verts, faces, _, _ = marching_cubes(cell.astype(np.float64), level=0.5, method="lorensen", allow_degenerate=True)
        triangles.append(verts[faces])
    return tuple(triangles)


@functools.lru_cache(maxsize=64)
def _surfel_area_table_cached(spacing: tuple[float, float, float]) -> np.ndarray:
    scale = np.asarray(spacing, dtype=np.float64)
    table = np.zeros(256, dtype=np.float64)
    for code, tri in enumerate(_unit_cell_triangles()):
        if len(tri):
            t = tri * scale
            table[code] = 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1).sum()
    table.flags.writeable = False
    return table


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """Area in mm^2 of the surface element of each 2 x 2 x 2 neighbourhood code (256 entries)."""
    return _surfel_area_table_cached(_spacing_tuple(spacing))


def _spacing_tuple(spacing: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in np.asarray(spacing, dtype=np.float64).ravel())
    except (TypeError, ValueError):
        raise Flare23Error(f"spacing {spacing!r} is not three numbers") from None
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise Flare23Error(f"spacing {values} must be three positive finite numbers (mm)")
    return values


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Code of every voxel corner: shape ``mask.shape + 1``; bit ``4a + 2b + c`` = voxel at offset (a, b, c).

    The mask is padded with one background voxel on every side, so corner ``(i, j, k)`` sees voxels
    ``i-1..i``, ``j-1..j``, ``k-1..k`` of the mask.
    """
    padded = np.pad(mask.astype(np.uint8, copy=False), 1)
    code = padded[:, :, :-1] | (padded[:, :, 1:] << 1)
    code = code[:, :-1, :] | (code[:, 1:, :] << 2)
    return code[:-1, :, :] | (code[1:, :, :] << 4)


def surface_distances(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> dict[str, np.ndarray]:
    """Surfel distances and areas of two 3D boolean masks (not sorted), like ``surface-distance``'s dict.

    Keys: ``distances_gt_to_pred``, ``distances_pred_to_gt`` (mm; ``inf`` when the other surface
    is empty), ``surfel_areas_gt``, ``surfel_areas_pred`` (mm^2). The masks are cropped to the
    bounding box of ``gt | pred`` first.
    """
    spacing = _spacing_tuple(spacing)
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.ndim != 3 or gt.shape != pred.shape:
        raise Flare23Error(f"masks must be 3D and of the same shape, got {gt.shape} and {pred.shape}")
    box = mask_box(gt | pred)
    if box is None:
        empty = np.zeros(0)
        return {
            "distances_gt_to_pred": empty,
            "distances_pred_to_gt": empty,
            "surfel_areas_gt": empty,
            "surfel_areas_pred": empty,
        }
    return _surface_distances_cropped(gt[box], pred[box], spacing)


def _surface_distances_cropped(gt: np.ndarray, pred: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, np.ndarray]:
    table = surfel_area_table(spacing)
    code_gt, code_pred = _neighbour_codes(gt), _neighbour_codes(pred)
    border_gt = (code_gt != 0) & (code_gt != 255)
    border_pred = (code_pred != 0) & (code_pred != 255)

    def dist_to(border: np.ndarray, at: np.ndarray) -> np.ndarray:
        if not at.any():
            return np.zeros(0)
        if not border.any():
            return np.full(int(at.sum()), np.inf)
        return ndimage.distance_transform_edt(~border, sampling=spacing)[at]

    return {
        "distances_gt_to_pred": dist_to(border_pred, border_gt),
        "distances_pred_to_gt": dist_to(border_gt, border_pred),
        "surfel_areas_gt": table[code_gt[border_gt]],
        "surfel_areas_pred": table[code_pred[border_pred]],
    }


def _surface_dice_cropped(gt: np.ndarray, pred: np.ndarray, spacing: tuple[float, float, float], tolerance_mm: float) -> float:
    d = _surface_distances_cropped(gt, pred, spacing)
    area_gt, area_pred = d["surfel_areas_gt"], d["surfel_areas_pred"]
    total = area_gt.sum() + area_pred.sum()
    if total == 0:
        return float("nan")
    close = area_gt[d["distances_gt_to_pred"] <= tolerance_mm].sum() + area_pred[d["distances_pred_to_gt"] <= tolerance_mm].sum()
    return float(close / total)


# --- public per-mask metrics -------------------------------------------------------------------
def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Dice of two masks (non-zero = inside) with FLARE's empty rules: both empty 1.0, one empty 0.0."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise Flare23Error(f"masks must have the same shape, got {gt.shape} and {pred.shape}")
    n_gt, n_pred = int(np.count_nonzero(gt)), int(np.count_nonzero(pred))
    if n_gt + n_pred == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(gt & pred)) / (n_gt + n_pred)


def normalized_surface_dice(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Surface Dice at ``tolerance_mm`` of two 3D masks (no slab or cut-off; those are evaluate_case's).

    Equals ``surface_distance.compute_surface_dice_at_tolerance(compute_surface_distances(gt, pred,
    spacing), tolerance_mm)`` when both masks are non-empty; both empty gives 1.0 and exactly one
    empty gives 0.0 (FLARE's rule; ``surface-distance`` gives NaN and 0.0).
    """
    spacing = _spacing_tuple(spacing)
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.ndim != 3 or gt.shape != pred.shape:
        raise Flare23Error(f"masks must be 3D and of the same shape, got {gt.shape} and {pred.shape}")
    box_gt, box_pred = mask_box(gt), mask_box(pred)
    if box_gt is None and box_pred is None:
        return 1.0
    if box_gt is None or box_pred is None:
        return 0.0
    box = _union_box(box_gt, box_pred)
    return _surface_dice_cropped(gt[box], pred[box], spacing, float(tolerance_mm))


def _union_box(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


# --- per case ----------------------------------------------------------------------------------
def _as_label_map(arr: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise Flare23Error(f"{what}: label map has non-integer values")
        return rounded.astype(np.int32)
    raise Flare23Error(f"{what}: label map has unsupported type {arr.dtype}")


def evaluate_case(
    ref: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    labels: Iterable[int] = FOREGROUND_IDS,
    nsd_cutoff: float = NSD_DSC_CUTOFF,
    tolerances: Mapping[int, float] | None = None,
    slab_ids: Iterable[int] = SLAB_RESTRICTED_IDS,
) -> dict[int, tuple[float, float]]:
    """FLARE DSC and NSD of each label of one case: ``{label: (dsc, nsd)}``.

    ``ref`` and ``pred`` are 3D label maps of the same shape on the same grid; ``spacing`` is the
    voxel size in mm along the three array axes (the reference header's). ``tolerances`` defaults
    to ``NSD_TOLERANCE_MM``; ``slab_ids`` to ``SLAB_RESTRICTED_IDS`` (slab along the third axis).
    """
    spacing = _spacing_tuple(spacing)
    ref = _as_label_map(ref, "reference")
    pred = _as_label_map(pred, "prediction")
    if ref.ndim != 3:
        raise Flare23Error(f"label maps must be 3D, got shape {ref.shape}")
    if ref.shape != pred.shape:
        raise Flare23Error(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    labels = [int(c) for c in labels]
    if not labels:
        return {}
    if min(labels) < 1:
        raise Flare23Error(f"labels must be >= 1, got {labels}")
    tolerances = NSD_TOLERANCE_MM if tolerances is None else tolerances
    slab_ids = {int(c) for c in slab_ids}
    max_label = max(labels)
    boxes_ref = ndimage.find_objects(ref, max_label=max_label)
    boxes_pred = ndimage.find_objects(pred, max_label=max_label)

    def box(boxes, c):
        return boxes[c - 1] if c - 1 < len(boxes) else None

    results: dict[int, tuple[float, float]] = {}
    for c in labels:
        box_g, box_p = box(boxes_ref, c), box(boxes_pred, c)
        if box_g is None and box_p is None:
            results[c] = (1.0, 1.0)
            continue
        if box_g is None or box_p is None:
            results[c] = (0.0, 0.0)
            continue
        crop = list(_union_box(box_g, box_p))
        if c in slab_ids:
            z_lo, z_hi = box_g[2].start, box_g[2].stop - 1  # G's lowest slice, G's highest slice (excluded)
            lo, hi = max(crop[2].start, z_lo), min(crop[2].stop, z_hi)
            if hi <= lo:  # G lies in one slice: empty slab, both restricted masks empty (module docstring)
                results[c] = (1.0, 1.0)
                continue
            crop[2] = slice(lo, hi)
        crop = tuple(crop)
        g = ref[crop] == c
        p = pred[crop] == c
        n_g, n_p = int(np.count_nonzero(g)), int(np.count_nonzero(p))
        if n_g == 0 or n_p == 0:  # only reachable after the slab restriction
            results[c] = (1.0, 1.0) if n_g == n_p else (0.0, 0.0)
            continue
        dsc = 2.0 * int(np.count_nonzero(g & p)) / (n_g + n_p)
        if dsc < nsd_cutoff:
            nsd = 0.0
        else:
            nsd = _surface_dice_cropped(g, p, spacing, float(tolerances[c]))
        results[c] = (dsc, nsd)
    return results


# --- aggregation -------------------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def aggregate(per_case: list[Mapping[int, tuple[float, float]]]) -> dict:
    """Challenge aggregation of :func:`evaluate_case` results.

    Per class: mean over the cases that scored it. ``organ_dsc`` / ``organ_nsd``: mean of the
    organ class means (the 13 organs, or those of them that were scored); ``tumor_dsc`` /
    ``tumor_nsd``: the tumor class mean. ``per_class`` maps the snake_case name of each scored class
    to ``{"dsc", "nsd", "n"}``. Values are ``None`` where nothing was scored.
    """
    per_class: dict[int, dict] = {}
    ids = sorted({int(c) for case in per_case for c in case})
    for c in ids:
        scores = [case[c] for case in per_case if c in case]
        per_class[c] = {
            "dsc": _mean([float(s[0]) for s in scores]),
            "nsd": _mean([float(s[1]) for s in scores]),
            "n": len(scores),
        }
    organs = [c for c in ORGAN_IDS if c in per_class]
    tumor = per_class.get(TUMOR_ID)
    return {
        "organ_dsc": _mean([per_class[c]["dsc"] for c in organs]),
        "organ_nsd": _mean([per_class[c]["nsd"] for c in organs]),
        "tumor_dsc": tumor["dsc"] if tumor else None,
        "tumor_nsd": tumor["nsd"] if tumor else None,
        "n_cases": len(per_case),
        "per_class": {LABEL_KEYS.get(c, f"label_{c}"): v for c, v in per_class.items()},
    }
