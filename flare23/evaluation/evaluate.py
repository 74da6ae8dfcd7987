"""``flare23 evaluate PRED_DIR REF_DIR --out OUT_DIR``: FLARE 2023 scores of a folder of predictions.

Every reference NIfTI file in ``REF_DIR`` is a case (its name without ``.nii.gz`` / ``.nii``; a
trailing ``_0000`` is kept: label names carry no channel suffix, :func:`flare23.io.index_cases`). Its
prediction is the file of ``PRED_DIR`` with the same case name.
Each case is scored by :func:`flare23.evaluation.metrics.evaluate_case` on the reference grid, with the voxel
size from the reference header (``header.get_zooms()``, as the organisers' script does); a
reference without a prediction is scored as an empty prediction and listed under ``missing``
(``skip_missing=True``: only the cases with a prediction are scored, the others are listed under
``not_scored``).

Grids (:mod:`flare23.data.grids`): a prediction on the reference grid up to the order and direction of
its axes (same world coordinates of every voxel centre to 1e-3 mm, e.g. LAS against LPS) is
transposed and flipped onto the reference grid exactly before scoring (listed under
``reoriented``). Any other grid is an error naming the case and both grids, unless
``resample="nearest"``: the prediction is then resampled onto the reference grid with nearest
neighbour interpolation in world coordinates (listed under ``resampled``, with a warning).

Outputs (written atomically; inputs are only read):

* ``OUT_DIR/per_case.csv``: column ``case``, then ``<name>_dsc`` and ``<name>_nsd`` for each label
  (liver, right_kidney, ..., left_kidney, tumor);
* ``OUT_DIR/summary.json``: ``organ_dsc``, ``organ_nsd``, ``tumor_dsc``, ``tumor_nsd``,
  ``per_class`` (name -> mean ``dsc``, ``nsd`` and the number of cases ``n``), ``n_cases``,
  ``missing`` (cases without a prediction), ``unmatched_predictions`` (predictions without a
  reference, ignored), ``not_scored``, ``reoriented``, ``resampled``, ``skip_missing``, ``nsd_cutoff``,
  and ``lesions`` (lesion-wise tumor scores, not part of FLARE's aggregate): ``recall_by_size``
  (``"<1"``: v < 1 ml, ``"1-10"``: 1 <= v <= 10 ml, ``">10"``: v > 10 ml, and ``"all"``; each
  ``{"n", "detected", "recall"}``, ``recall`` null when n is 0), ``fp_components_per_case`` (mean over
  the scored cases), ``fp_components_total``, ``mean_lesion_dsc`` (null when there is no lesion);
* ``OUT_DIR/lesions.csv``: ``case, lesion, voxels, volume_ml, host, detected, dsc``, one row per
  26-connected reference tumor component and one (``lesion`` = ``fp<k>``, ``detected`` / ``dsc``
  empty) per predicted tumor component that overlaps none (:mod:`flare23.evaluation.lesions`; a
  missing prediction detects nothing).

Cases run in parallel over ``workers`` processes, with a progress bar.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from flare23.constants import FOREGROUND_IDS, LABEL_KEYS, NSD_DSC_CUTOFF
from flare23.data.grids import RESAMPLE_MODES, to_reference_grid
from flare23.errors import Flare23Error
from flare23.evaluation.lesions import lesion_rows, lesions_csv, summarize_lesions
from flare23.evaluation.metrics import aggregate, evaluate_case
from flare23.io import atomic_write_json, atomic_write_text, case_name, ensure_output_dir, index_cases, load_nifti

logger = logging.getLogger(__name__)

PER_CASE_CSV = "per_case.csv"
SUMMARY_JSON = "summary.json"
LESIONS_CSV = "lesions.csv"


def csv_columns(labels=FOREGROUND_IDS) -> list[str]:
    """Columns of ``per_case.csv``: ``case``, then ``<name>_dsc``, ``<name>_nsd`` per label."""
    columns = ["case"]
    for c in labels:
        columns += [f"{LABEL_KEYS[c]}_dsc", f"{LABEL_KEYS[c]}_nsd"]
    return columns


def load_label_map(path: str | os.PathLike, what: str = "label map"):
    """Read a label map: ``(array, affine, header)``; NaN, fractional or negative values are an error naming ``path``.

    Values above 14 are kept (they are not scored, as in the organisers' script).
    """
    data, affine, header = load_nifti(path)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise Flare23Error(f"{path}: {what} has NaN or infinite values")
        if not np.array_equal(data, np.rint(data)):
            raise Flare23Error(f"{path}: {what} has non-integer values")
        data = np.rint(data).astype(np.int32)
    elif data.dtype != np.bool_ and not np.issubdtype(data.dtype, np.integer):
        raise Flare23Error(f"{path}: {what} has unsupported type {data.dtype}")
    if data.size and np.issubdtype(data.dtype, np.signedinteger) and int(data.min()) < 0:
        raise Flare23Error(f"{path}: {what} has negative values (minimum {int(data.min())})")
    return data, affine, header


def score_case(
    case: str,
    ref_path: str | os.PathLike,
    pred_path: str | os.PathLike | None,
    nsd_cutoff: float = NSD_DSC_CUTOFF,
    labels=FOREGROUND_IDS,
    resample: str | None = None,
) -> dict:
    """Score one case from files: ``{"case", "scores": {label: (dsc, nsd)}, "lesions": rows, "missing": bool, "grid": how}``.

    ``grid`` says how the prediction reached the reference grid: ``"same"``, ``"reoriented"``
    (exact axis transpose / flip), ``"resampled"`` (``resample="nearest"``) or ``"missing"``.
    ``lesions``: :func:`flare23.evaluation.lesions.lesion_rows` on the reference grid.
    """
    ref, ref_affine, header = load_label_map(ref_path, "reference")
    spacing = tuple(float(z) for z in header.get_zooms()[:3])
    if pred_path is None:
        pred, how = np.zeros(ref.shape, dtype=np.uint8), "missing"
    else:
        pred, pred_affine, _ = load_label_map(pred_path, "prediction")
        pred, how = to_reference_grid(pred, pred_affine, ref.shape, ref_affine, case, pred_path, resample)
        if how == "resampled":
            logger.warning("case %s: prediction %s resampled onto the reference grid (nearest neighbour)", case, pred_path)
        elif how == "reoriented":
            logger.info("case %s: prediction axes transposed / flipped onto the reference grid", case)
    try:
        scores = evaluate_case(ref, pred, spacing, labels=labels, nsd_cutoff=nsd_cutoff)
    except Flare23Error as exc:
        raise Flare23Error(f"case {case} ({ref_path}): {exc}") from None
    lesions = lesion_rows(case, ref, pred, spacing)
    return {"case": case, "scores": scores, "lesions": lesions, "missing": pred_path is None, "grid": how}


def _per_case_csv(rows: list[dict], labels) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_columns(labels))
    for row in rows:
        values = [row["case"]]
        for c in labels:
            dsc, nsd = row["scores"][c]
            values += [repr(float(dsc)), repr(float(nsd))]
        writer.writerow(values)
    return buf.getvalue()


def evaluate_folders(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    nsd_cutoff: float = NSD_DSC_CUTOFF,
    workers: int = 1,
    progress: bool = True,
    labels=FOREGROUND_IDS,
    resample: str | None = None,
    skip_missing: bool = False,
) -> dict:
    """Score every reference case in ``ref_dir`` against ``pred_dir``; write the CSVs and JSON; return the summary.

    ``resample``: None (a prediction on a non-equivalent grid is an error) or ``"nearest"``.
    ``skip_missing``: score only the reference cases that have a prediction.
    """
    from tqdm.auto import tqdm

    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    try:
        nsd_cutoff = float(nsd_cutoff)
    except (TypeError, ValueError):
        raise Flare23Error(f"nsd_cutoff {nsd_cutoff!r} is not a number") from None
    if not 0.0 <= nsd_cutoff <= 1.0:
        raise Flare23Error(f"nsd_cutoff {nsd_cutoff} must lie in [0, 1]")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise Flare23Error(f"workers {workers!r} must be a positive integer")
    if resample not in RESAMPLE_MODES:
        raise Flare23Error(f"resample {resample!r} is not one of: nearest (or leave it out to refuse other grids)")
    if not isinstance(skip_missing, bool):
        raise Flare23Error(f"skip_missing {skip_missing!r} must be True or False")
    labels = tuple(int(c) for c in labels)
    refs = index_cases(ref_dir, what="reference")
    preds = index_cases(pred_dir, what="prediction", allow_empty=True)
    out_dir = ensure_output_dir(out_dir)
    missing = sorted(c for c in refs if c not in preds)
    unmatched = sorted(c for c in preds if c not in refs)
    not_scored: list[str] = []
    if skip_missing:
        not_scored, missing = missing, []
        if not_scored:
            logger.warning("%d reference cases without a prediction are not scored (skip_missing)", len(not_scored))
        if len(not_scored) == len(refs):
            raise Flare23Error(f"{pred_dir}: no prediction for any reference case of {ref_dir} (skip_missing)")
    for case in missing:
        logger.warning("case %s: no prediction in %s, scored as an empty prediction", case, pred_dir)
    if unmatched:
        logger.warning("%d predictions without a reference are ignored: %s", len(unmatched), ", ".join(unmatched[:5]))

    jobs = [
        (case, str(refs[case]), str(preds[case]) if case in preds else None) for case in sorted(refs) if case not in not_scored
    ]
    rows: list[dict] = []
    bar = tqdm(total=len(jobs), desc="evaluate", unit="case", disable=None if progress else True)  # None: only on a terminal
    try:
        if workers == 1 or len(jobs) == 1:
            for case, ref_path, pred_path in jobs:
                rows.append(score_case(case, ref_path, pred_path, nsd_cutoff, labels, resample))
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
                futures = [
                    pool.submit(score_case, case, ref_path, pred_path, nsd_cutoff, labels, resample)
                    for case, ref_path, pred_path in jobs
                ]
                try:
                    for future in as_completed(futures):
                        rows.append(future.result())
                        bar.update(1)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    finally:
        bar.close()
    rows.sort(key=lambda r: r["case"])

    summary = aggregate([r["scores"] for r in rows])
    summary.update(
        {
            "missing": missing,
            "unmatched_predictions": unmatched,
            "not_scored": not_scored,
            "reoriented": [r["case"] for r in rows if r["grid"] == "reoriented"],
            "resampled": [r["case"] for r in rows if r["grid"] == "resampled"],
            "skip_missing": skip_missing,
            "nsd_cutoff": nsd_cutoff,
            "pred_dir": str(pred_dir),
            "ref_dir": str(ref_dir),
            "lesions": summarize_lesions([x for r in rows for x in r["lesions"]], len(rows)),
        }
    )
    atomic_write_text(out_dir / PER_CASE_CSV, _per_case_csv(rows, labels))
    atomic_write_text(out_dir / LESIONS_CSV, lesions_csv([x for r in rows for x in r["lesions"]]))
    atomic_write_json(out_dir / SUMMARY_JSON, summary)
    return summary


def _fmt(value) -> str:
    return "   -  " if value is None else f"{value:.4f}"


def format_summary(summary: dict) -> str:
    """A short text table of a summary: one line per class, then organs and tumor."""
    lines = [f"{'class':<22} {'DSC':>6}  {'NSD':>6}"]
    for name, v in summary["per_class"].items():
        lines.append(f"{name:<22} {_fmt(v['dsc']):>6}  {_fmt(v['nsd']):>6}")
    lines.append(f"{'organs (mean of 13)':<22} {_fmt(summary['organ_dsc']):>6}  {_fmt(summary['organ_nsd']):>6}")
    lines.append(f"{'tumor':<22} {_fmt(summary['tumor_dsc']):>6}  {_fmt(summary['tumor_nsd']):>6}")
    extra = f"{summary['n_cases']} cases"
    if summary.get("missing"):
        extra += f", {len(summary['missing'])} without prediction (scored empty): {', '.join(summary['missing'][:5])}"
        if len(summary["missing"]) > 5:
            extra += ", ..."
    if summary.get("not_scored"):
        extra += f", {len(summary['not_scored'])} references without prediction not scored (skip_missing)"
    if summary.get("resampled"):
        extra += f", {len(summary['resampled'])} resampled (nearest): {', '.join(summary['resampled'][:5])}"
    lines.append(extra)
    return "\n".join(lines)


def evaluate_cli(
    pred_dir: str,
    ref_dir: str,
    out: str,
    nsd_cutoff: float = NSD_DSC_CUTOFF,
    workers: int = 1,
    resample: str | None = None,
    skip_missing: bool = False,
) -> None:
    """Score PRED_DIR against REF_DIR (FLARE 2023 DSC / NSD); write OUT/per_case.csv, OUT/lesions.csv and OUT/summary.json.

    A prediction whose grid is the reference grid with its axes reordered or reversed (same voxel
    centres to 1e-3 mm, e.g. LAS against LPS) is transposed / flipped onto it exactly; any other
    grid is an error unless --resample nearest.

    Args:
        pred_dir: folder of predicted label maps (NIfTI), named like the references.
        ref_dir: folder of reference label maps (NIfTI); every file is a case.
        out: output folder (created if needed; written only when every case is scored).
        nsd_cutoff: NSD is 0 where DSC is below this (challenge 0.1; organisers' current code 0.2).
        workers: cases scored in parallel (processes).
        resample: "nearest" resamples a prediction on another grid onto the reference grid (nearest neighbour, world coordinates); default: refuse it (error, exit 2).
        skip_missing: score only the cases that have a prediction (default: a reference without prediction is scored as an empty prediction, as FLARE does).
    """
    summary = evaluate_folders(
        pred_dir, ref_dir, out, nsd_cutoff=nsd_cutoff, workers=workers, progress=True,
        resample=resample, skip_missing=skip_missing,
    )  # fmt: skip
    print(format_summary(summary))
    print(f"wrote {Path(out) / PER_CASE_CSV}, {Path(out) / LESIONS_CSV} and {Path(out) / SUMMARY_JSON}")


def evaluate_datalist(
    pred_dir: str | os.PathLike,
    datalist: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str = "validation",
    nsd_cutoff: float = NSD_DSC_CUTOFF,
    workers: int = 1,
    progress: bool = True,
    resample: str | None = None,
    skip_missing: bool = False,
) -> dict:
    """Score the ``split`` cases of a MONAI datalist (their ``label`` files) against ``pred_dir``.

    Predictions are named after the images' case names (``<case>_0000.nii.gz`` -> ``<case>.nii.gz``),
    as the pipeline writes them. The references are linked into a temporary folder so that only
    the split's cases are scored.
    """
    import shutil
    import tempfile

    items = datalist_split(datalist, split)
    work = Path(tempfile.mkdtemp(prefix="flare23-refs-"))
    try:
        for item in items:
            if "label" not in item:
                raise Flare23Error(f"{datalist}: {split} entry {item['image']} has no label")
            os.symlink(Path(item["label"]).resolve(), work / f"{case_name(item['image'])}.nii.gz")
        summary = evaluate_folders(
            pred_dir, work, out_dir, nsd_cutoff=nsd_cutoff, workers=workers, progress=progress,
            resample=resample, skip_missing=skip_missing,
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["ref_dir"] = f"{datalist}#{split}"
    atomic_write_json(Path(out_dir) / "summary.json", summary)
    return summary


def datalist_split(datalist: str | os.PathLike, split: str = "validation") -> list[dict]:
    """The ``split`` list of a MONAI datalist JSON with absolute ``image`` / ``label`` paths."""
    import json

    path = Path(datalist)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Flare23Error(f"{path}: cannot read the datalist ({exc})") from None
    if split not in data or not data[split]:
        raise Flare23Error(f"{path}: no {split!r} cases")
    items = []
    for entry in data[split]:
        item = {k: str((path.parent / v).resolve()) if k in ("image", "label") else v for k, v in entry.items()}
        items.append(item)
    return items
