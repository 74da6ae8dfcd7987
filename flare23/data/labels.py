"""Full training labels from partial + pseudo labels (``flare23 merge-labels``) and the label-box helpers (METHOD.md section 2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from flare23.constants import ORGAN_IDS, TUMOR_ID
from flare23.data.boxes import mask_box, spacing_margin_voxels
from flare23.data.prepare import _check_headers, _check_output_dir, _echo, _load_label, _pair_folders, _run_cases, _save_all
from flare23.io import (
    check_pair,
)


# --- pure functions on arrays --------------------------------------------------------------------
def merge_labels(partial: np.ndarray, pseudo: np.ndarray, return_counts: bool = False):
    """Full label map from a partial label and a pseudo label (METHOD.md section 2).

    Start from the pseudo label's organ map (organs 1-13; anything else there, tumor included,
    becomes background); every voxel that the partial label annotates (> 0) takes the partial
    label's value; tumor (14) therefore comes only from the partial label. Returns a uint8 array,
    or ``(array, counts)`` with ``return_counts``: voxels ``from_partial``, ``from_pseudo`` and
    ``background`` (they sum to the number of voxels).
    """
    partial = np.asarray(partial)
    pseudo = np.asarray(pseudo)
    if partial.shape != pseudo.shape:
        raise ValueError(f"partial label shape {partial.shape} differs from pseudo label shape {pseudo.shape}")
    pseudo_organs = np.where(np.isin(pseudo, ORGAN_IDS), pseudo, 0)
    annotated = partial > 0
    merged = np.where(annotated, partial, pseudo_organs).astype(np.uint8)
    if not return_counts:
        return merged
    from_partial = int(np.count_nonzero(annotated))
    from_pseudo = int(np.count_nonzero(~annotated & (pseudo_organs > 0)))
    counts = {
        "from_partial": from_partial,
        "from_pseudo": from_pseudo,
        "background": int(merged.size - from_partial - from_pseudo),
    }
    return merged, counts


def bbox_with_margin(
    mask: np.ndarray, spacing: Sequence[float], margin_mm: float | Sequence[float] = 0.0
) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` (nonzero voxels) widened by ``margin_mm`` and clamped to the array.

    The margin is converted per axis with the voxel ``spacing`` (mm, one value per array axis) by
    :func:`flare23.data.boxes.spacing_margin_voxels`. Returns one ``slice`` per axis, or ``None`` for an empty mask.
    """
    mask = np.asarray(mask)
    box = mask_box(mask)
    if box is None:
        return None
    pad = spacing_margin_voxels(spacing, margin_mm)
    if len(pad) != mask.ndim:
        raise ValueError(f"spacing has {len(pad)} values for a {mask.ndim}D mask")
    return tuple(slice(max(0, s.start - m), min(n, s.stop + m)) for s, m, n in zip(box, pad, mask.shape))


def box_inside(inner: Sequence[slice], outer: Sequence[slice]) -> bool:
    """Whether box ``inner`` lies within box ``outer`` (both tuples of slices with explicit bounds)."""
    return all(o.start <= i.start and i.stop <= o.stop for i, o in zip(inner, outer))


def tumor_inside_organs(label: np.ndarray) -> bool:
    """The paper's case selection: the tumor bounding box lies inside the organ bounding box.

    A case without tumor is kept (True); a tumor without any organ is not (False).
    """
    label = np.asarray(label)
    tumor_box = bbox_with_margin(label == TUMOR_ID, (1.0,) * label.ndim, 0.0)
    if tumor_box is None:
        return True
    organ_box = bbox_with_margin(np.isin(label, ORGAN_IDS), (1.0,) * label.ndim, 0.0)
    return organ_box is not None and box_inside(tumor_box, organ_box)


# --- merge-labels --------------------------------------------------------------------------------
def _merge_case(case: str, partial_path: Path, pseudo_path: Path, out_path: Path) -> dict:
    partial, affine, header = _load_label(partial_path)
    pseudo, pseudo_affine, _ = _load_label(pseudo_path)
    check_pair(partial_path, partial.shape, affine, pseudo_path, pseudo.shape, pseudo_affine)
    merged, counts = merge_labels(partial, pseudo, return_counts=True)
    _save_all([(merged, affine, header, out_path, np.uint8)])
    return counts


def merge_labels_cli(partial: str, pseudo: str, out: str, workers: int = 1) -> None:
    """Full labels from partial + pseudo labels (METHOD.md section 2), one ``<case>.nii.gz`` each.

    Args:
        partial: folder of partial labels ``<case>.nii.gz`` (FLARE's annotations, tumor included).
        pseudo: folder of pseudo labels ``<case>.nii.gz`` (organs 1-13 are used; tumor 14 is dropped).
            Pseudo labels without a partial label are ignored; a partial label without its
            pseudo label is an error.
        out: output folder (created; must differ from the input folders).
        workers: parallel processes.

    Prints, per case, the voxels taken from the partial label, from the pseudo label, and left
    background.
    """
    pairs = _pair_folders(partial, pseudo, False, "partial label", "pseudo label", allow_extra_second=True)
    _check_headers(pairs)
    out_dir = _check_output_dir(out, [partial, pseudo])
    jobs = [(case, a, b, out_dir / f"{case}.nii.gz") for case, a, b in pairs]

    def report(job, counts):
        _echo(
            f"{job[0]}: {counts['from_partial']} voxels from partial, {counts['from_pseudo']} from pseudo, {counts['background']} background"
        )

    results = _run_cases(_merge_case, jobs, workers, "merge-labels", report)
    total = {k: sum(r[k] for r in results) for k in ("from_partial", "from_pseudo", "background")}
    print(
        f"merged {len(results)} cases into {out_dir}: {total['from_partial']} voxels from partial, "
        f"{total['from_pseudo']} from pseudo, {total['background']} background"
    )


def bbox_with_physical_margins(
    mask: np.ndarray, affine, margins_mm: Mapping[str, float], margins_above_mm: Mapping[str, float] | None = None
) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` widened by margins towards the ``feet``, the ``head`` and ``inplane`` (mm).

    The directions are physical and converted with ``affine`` exactly as the ROI box's margins
    (:func:`flare23.roi.box.physical_margin_voxels`); clamped to the array. ``None`` for an empty mask.
    ``margins_above_mm``: other margins for the sides at the higher array indices (default: the same).
    """
    from flare23.roi.box import physical_margin_voxels  # lazy: flare23.roi imports torch

    box = mask_box(mask)
    if box is None:
        return None
    below, above = physical_margin_voxels(affine, margins_mm)
    if margins_above_mm is not None:
        above = physical_margin_voxels(affine, margins_above_mm)[1]
    lo = np.array([s.start for s in box]) - below
    hi = np.array([s.stop for s in box]) + above
    return tuple(slice(int(max(0, a)), int(min(n, b))) for a, b, n in zip(lo, hi, mask.shape))
