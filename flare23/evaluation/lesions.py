"""Lesion-wise tumor scores of one case and their summary (``lesions.csv``, ``summary.json["lesions"]``).

Not part of FLARE's ranking (that is :func:`flare23.evaluation.metrics.aggregate`, unchanged): these
rows say which tumors a prediction finds, how well, and where it adds tumors that are not there.

Everything runs on the reference grid (the prediction already moved onto it by
:func:`flare23.evaluation.evaluate.score_case`), on the tumor label ``TUMOR_ID`` (14):

* lesions are the 26-connected components of the reference tumor (corners count: two blobs touching
  at one corner are one lesion), numbered 1, 2, ... in :func:`scipy.ndimage.label`'s order (raster
  order of each component's first voxel); the predicted tumor is split into components the same way;
* one row per reference lesion: ``voxels``, ``volume_ml`` (voxels x the reference header's voxel
  volume / 1000), ``host``, ``detected`` (1 when any predicted tumor voxel lies in the lesion, else 0)
  and ``dsc``, the Dice of the lesion against the union of the predicted components that overlap it
  (0.0 when it is not detected). **Decision:** a predicted component that overlaps two reference
  lesions counts toward both: all of its voxels are in both lesions' unions (so a prediction that
  merges two lesions is penalised in both Dice values, and is not a false positive);
* one row per predicted component that overlaps no reference lesion (a false positive), named
  ``fp1``, ``fp2``, ... per case in labelling order, with ``voxels``, ``volume_ml`` and ``host``;
  ``detected`` and ``dsc`` are empty;
* ``host`` is read in the REFERENCE: the most frequent organ label (1..13) among the voxels of the
  component's one-voxel 26-neighbourhood shell (its 3 x 3 x 3 dilation minus itself), as its
  ``LABEL_KEYS`` name; ties go to the lowest label id; empty when no organ voxel touches it (tumor,
  background and labels above 14 are not organs).

:func:`summarize_lesions` bins reference lesions by volume in ml: ``"<1"`` (v < 1), ``"1-10"``
(1 <= v <= 10) and ``">10"`` (v > 10).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from flare23.constants import LABEL_KEYS, ORGAN_IDS, TUMOR_ID
from flare23.data.boxes import mask_box

__all__ = ["LESION_COLUMNS", "SIZE_BINS", "lesion_rows", "lesions_csv", "size_bin", "summarize_lesions"]

#: Columns of ``lesions.csv``, in order.
LESION_COLUMNS: tuple[str, ...] = ("case", "lesion", "voxels", "volume_ml", "host", "detected", "dsc")
#: Volume bins (ml) of ``recall_by_size``: ``<1`` is v < 1, ``1-10`` is 1 <= v <= 10, ``>10`` is v > 10.
SIZE_BINS: tuple[str, ...] = ("<1", "1-10", ">10")
_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a boolean mask: ``(labels, count)``."""
    labels, count = ndimage.label(mask, structure=_FULL)
    return labels, int(count)


def _padded_box(box: tuple[slice, ...], shape: Sequence[int], pad: int = 1) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, shape))


def _host(ref: np.ndarray, component: np.ndarray) -> str:
    """LABEL_KEYS name of the most frequent reference organ in the one-voxel shell of ``component`` ('' if none).

    ``ref`` and ``component`` are crops of the same box, which must reach one voxel past the component
    wherever the image does (the dilation does not see past the crop, as it cannot see past the image).
    """
    shell = ndimage.binary_dilation(component, structure=_FULL) & ~component
    values = ref[shell]
    organs = values[(values >= min(ORGAN_IDS)) & (values <= max(ORGAN_IDS))].astype(np.int64)
    if organs.size == 0:
        return ""
    return LABEL_KEYS[int(np.argmax(np.bincount(organs)))]


def _row(case: str, lesion: str, voxels: int, voxel_mm3: float, host: str, detected, dsc) -> dict:
    voxels = int(voxels)
    return {
        "case": case,
        "lesion": lesion,
        "voxels": voxels,
        "volume_ml": voxels * voxel_mm3 / 1000.0,
        "host": host,
        "detected": detected,
        "dsc": dsc,
    }


def lesion_rows(case: str, ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> list[dict]:
    """Rows of one case (reference lesions first, then ``fp<k>`` components), keyed by ``LESION_COLUMNS``.

    ``ref`` and ``pred`` are label maps on the same grid; ``spacing`` is the reference header's
    voxel size in mm. Reference rows carry ``detected`` (0 / 1) and ``dsc`` (float); false-positive
    rows carry ``None`` in both. Only the box around both tumors (plus one voxel) is labelled.
    """
    ref, pred = np.asarray(ref), np.asarray(pred)
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    box = mask_box((ref == TUMOR_ID) | (pred == TUMOR_ID))
    if box is None:
        return []
    box = _padded_box(box, ref.shape)
    ref = ref[box]
    ref_lab, n_ref = _components(ref == TUMOR_ID)
    pred_lab, n_pred = _components(pred[box] == TUMOR_ID)
    pred_sizes = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
    rows = [_reference_row(case, ref, ref_lab, pred_lab, pred_sizes, i, s, voxel_mm3) for i, s in _boxes(ref_lab, n_ref)]
    hit = np.zeros(n_pred + 1, dtype=bool)
    hit[pred_lab[ref_lab > 0]] = True
    k = 0
    for j, s in _boxes(pred_lab, n_pred):
        if hit[j]:
            continue
        k += 1
        s = _padded_box(s, ref.shape)
        component = pred_lab[s] == j
        rows.append(_row(case, f"fp{k}", pred_sizes[j], voxel_mm3, _host(ref[s], component), None, None))
    return rows


def _boxes(labels: np.ndarray, count: int):
    """``(label, box)`` of each component 1..count, in label order."""
    return [(i + 1, s) for i, s in enumerate(ndimage.find_objects(labels, max_label=count)) if s is not None]


def _reference_row(case, ref, ref_lab, pred_lab, pred_sizes, i, box, voxel_mm3) -> dict:
    """Row of reference lesion ``i``: Dice against the union of the predicted components overlapping it."""
    s = _padded_box(box, ref.shape)
    lesion = ref_lab[s] == i
    under = pred_lab[s][lesion]
    inter = int(np.count_nonzero(under))  # every predicted voxel in the lesion belongs to an overlapping component
    n = int(lesion.sum())
    union = int(pred_sizes[np.unique(under[under > 0])].sum())
    dsc = 2.0 * inter / (n + union) if inter else 0.0
    return _row(case, str(i), n, voxel_mm3, _host(ref[s], lesion), int(inter > 0), dsc)


def lesions_csv(rows: list[dict]) -> str:
    """Text of ``lesions.csv``: header ``LESION_COLUMNS``; floats as ``repr``; ``None`` as an empty field."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LESION_COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else repr(row[c]) if isinstance(row[c], float) else row[c] for c in LESION_COLUMNS])
    return buf.getvalue()


def size_bin(volume_ml: float) -> str:
    """``"<1"`` (v < 1 ml), ``"1-10"`` (1 <= v <= 10) or ``">10"`` (v > 10)."""
    if volume_ml < 1.0:
        return "<1"
    return "1-10" if volume_ml <= 10.0 else ">10"


def _recall(rows: list[dict]) -> dict:
    n, found = len(rows), sum(int(r["detected"]) for r in rows)
    return {"n": n, "detected": found, "recall": found / n if n else None}


def summarize_lesions(rows: list[dict], n_cases: int) -> dict:
    """``summary.json["lesions"]`` from the rows of all scored cases (``n_cases`` of them).

    ``recall_by_size``: for each of ``SIZE_BINS`` and ``"all"``, ``{"n", "detected", "recall"}``
    (``recall`` = detected / n, ``None`` when n == 0); ``fp_components_per_case`` (mean over the
    scored cases, ``None`` when there are none); ``fp_components_total``; ``mean_lesion_dsc``
    (mean ``dsc`` over reference lesions, ``None`` when there are none).
    """
    lesions = [r for r in rows if r["detected"] is not None]
    n_fp = len(rows) - len(lesions)
    recall = {b: _recall([r for r in lesions if size_bin(r["volume_ml"]) == b]) for b in SIZE_BINS}
    recall["all"] = _recall(lesions)
    return {
        "recall_by_size": recall,
        "fp_components_per_case": n_fp / n_cases if n_cases else None,
        "fp_components_total": n_fp,
        "mean_lesion_dsc": float(np.mean([r["dsc"] for r in lesions])) if lesions else None,
    }
