"""FLARE data tools: full labels from partial + pseudo labels, ROI labels, crops, CT fingerprint, datalists.

Each tool is a ``flare23`` subcommand (``merge-labels``, ``roi-labels``, ``crop``, ``fingerprint``,
``datalist``) over FLARE / nnU-Net style folders (images ``<case>_0000.nii.gz``, labels
``<case>.nii.gz``), with a pure function on arrays beside it (:func:`merge_labels`,
:func:`flare23.roi.roi_labels`, :func:`bbox_with_margin`, :func:`intensity_fingerprint`, :func:`split_cases`).
The rules are those of ``METHOD.md`` section 2.

Bad input and partial results. Every command checks, before it creates or writes anything, that
every image has its label (and every partial label its pseudo label) and that each file's header
describes a readable 3D volume whose shape and affine match its partner; then that the output
folder is writable and is not an input folder (for ``crop``: new or empty). Then the cases are
processed (in parallel with ``workers`` > 1, with a progress bar on a terminal); each case reads and
validates all its inputs in full (a truncated file is found here) before it writes its outputs,
which are written atomically. The first
failure stops the run: a one-line :class:`~flare23.errors.Flare23Error` that names the case and the
problem, exit status 2 (see :mod:`flare23.cli`). The failing case leaves no file; cases finished
before it keep their (complete) output files. Inputs are only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from flare23.boxes import mask_box, spacing_margin_voxels
from flare23.constants import CONTEXT_MARGINS_MM, IMAGE_SUFFIX, LABELS, ORGAN_IDS, TUMOR_ID
from flare23.errors import Flare23Error
from flare23.io import (
    atomic_path,
    atomic_write_json,
    check_affine,
    check_pair,
    ensure_output_dir,
    index_cases,
    load_image,
    load_nifti,
    save_nifti,
    voxel_spacing,
)

MAX_LABEL = max(LABELS)
FINGERPRINT_PERCENTILES = (0.5, 99.5)


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
    :func:`flare23.boxes.spacing_margin_voxels`. Returns one ``slice`` per axis, or ``None`` for an empty mask.
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


def case_rng(seed: int, index: int) -> np.random.Generator:
    """Random generator of case number ``index``: ``SeedSequence(seed).spawn(n)[index]``, independent of n."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


def sample_foreground(image: np.ndarray, label: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` intensities drawn uniformly with replacement from the voxels where ``label > 0`` (none if empty)."""
    foreground = np.asarray(image)[np.asarray(label) > 0]
    if foreground.size == 0:
        return np.empty(0, dtype=np.float64)
    return rng.choice(foreground, size=int(n), replace=True).astype(np.float64)


def fingerprint_stats(values: np.ndarray, n_cases: int) -> dict:
    """Statistics of pooled foreground intensities, in the flat format of :func:`flare23.io.read_fingerprint`."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise Flare23Error("no foreground voxels (label > 0) in any case: cannot compute a fingerprint")
    low, high = (float(v) for v in np.percentile(values, FINGERPRINT_PERCENTILES))
    return {
        "clip_low": low,
        "clip_high": high,
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "median": float(np.median(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "percentile_00_5": low,
        "percentile_99_5": high,
        "n_cases": int(n_cases),
        "n_voxels": int(values.size),
    }


def intensity_fingerprint(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray], samples: int = 10_000_000, seed: int = 1234
) -> dict:
    """CT normalisation fingerprint as nnU-Net v2 computes it (``DatasetFingerprintExtractor``).

    Each of the n cases contributes ``samples // n`` intensities drawn uniformly with replacement
    from its foreground (label > 0), with the generator :func:`case_rng` ``(seed, case index)``
    (nnU-Net reseeds every case with the same seed; per-case streams avoid correlated draws). The
    pooled values give the 0.5 / 99.5 percentiles (``clip_low`` / ``clip_high``), mean, std (ddof
    0), median, min and max. Cases without foreground contribute nothing.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    per_case = _samples_per_case(samples, len(images))
    pooled = [sample_foreground(img, lbl, per_case, case_rng(seed, i)) for i, (img, lbl) in enumerate(zip(images, labels))]
    return fingerprint_stats(np.concatenate(pooled), len(images))


def _samples_per_case(samples: int, n_cases: int) -> int:
    if n_cases < 1:
        raise Flare23Error("no cases to compute a fingerprint from")
    ok = isinstance(samples, (int, float, np.integer, np.floating)) and not isinstance(samples, bool)
    if not ok or not float(samples).is_integer() or samples < n_cases:  # 1e7 from the command line is a float
        raise Flare23Error(f"samples must be a whole number of at least the number of cases ({n_cases}), got {samples!r}")
    return int(samples) // n_cases


def split_score(case: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by the case name and the seed (SHA-256), used to split cases."""
    digest = hashlib.sha256(f"{int(seed)}/{case}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_cases(cases: Sequence[str], validation_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic training / validation split by case name.

    A case goes to validation when :func:`split_score` ``(case, seed) < validation_fraction``, so a
    case's side depends only on its name and the seed: adding cases never moves existing ones.
    With at least two cases and a fraction in (0, 1), neither side is left empty: if it would be,
    the case with the lowest score is moved to validation (or the highest to training); only in
    that small-data case can adding cases move this one case back.
    """
    if not 0.0 <= float(validation_fraction) < 1.0:
        raise Flare23Error(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    names = sorted(set(cases))
    scores = {c: split_score(c, seed) for c in names}
    validation = {c for c in names if scores[c] < validation_fraction}
    if len(names) >= 2 and validation_fraction > 0:
        if not validation:
            validation = {min(names, key=scores.__getitem__)}
        elif len(validation) == len(names):
            validation.discard(max(names, key=scores.__getitem__))
    return [c for c in names if c not in validation], [c for c in names if c in validation]


# --- case discovery and validation ---------------------------------------------------------------
def _pair_folders(first, second, first_is_images: bool, first_kind: str, second_kind: str, allow_extra_second: bool = False):
    """Sorted ``[(case, first_path, second_path)]``; a case missing on either side is an error."""
    a = index_cases(first, images=first_is_images)
    b = index_cases(second)
    for case, path in a.items():
        if case not in b:
            raise Flare23Error(f"case {case}: {first_kind} {path} has no {second_kind} {case}.nii.gz in {second}")
    if not allow_extra_second:
        for case, path in b.items():
            if case not in a:
                raise Flare23Error(f"case {case}: {second_kind} {path} has no {first_kind} in {first}")
    return [(case, a[case], b[case]) for case in sorted(a)]


def _header_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine from the header only (no voxel data read); checks 3D and the affine."""
    img = load_image(path)
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise Flare23Error(f"{path}: expected a 3D image, got shape {shape}")
    if min(shape) < 1:
        raise Flare23Error(f"{path}: empty image of shape {shape}")
    check_affine(img.affine, str(path))
    return shape, np.asarray(img.affine, dtype=float)


def _prefixed(case: str, exc: Flare23Error) -> Flare23Error:
    message = str(exc)
    return exc if message.startswith(f"case {case}:") else Flare23Error(f"case {case}: {message}")


def _check_headers(pairs) -> None:
    """Header check of every pair before any output is written (cheap: no voxel data read)."""
    for case, first, second in pairs:
        try:
            shape_a, affine_a = _header_geometry(first)
            shape_b, affine_b = _header_geometry(second)
            check_pair(first, shape_a, affine_a, second, shape_b, affine_b)
        except Flare23Error as exc:
            raise _prefixed(case, exc) from None


def _load_label(path: Path) -> tuple[np.ndarray, np.ndarray, object]:
    """Read a label volume in full; its values must be whole numbers in 0..14."""
    data, affine, header = load_nifti(path)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise Flare23Error(f"{path}: label values are not whole numbers")
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        raise Flare23Error(f"{path}: label has non-numeric type {data.dtype}")
    low, high = (data.min(), data.max()) if data.size else (0, 0)
    if low < 0 or high > MAX_LABEL:
        raise Flare23Error(f"{path}: label values must be in 0..{MAX_LABEL}, found {low:g}..{high:g}")
    return data.astype(np.uint8), affine, header


def _load_pair(image_path: Path, label_path: Path):
    image, image_affine, image_header = load_nifti(image_path)
    label, label_affine, label_header = _load_label(label_path)
    check_pair(image_path, image.shape, image_affine, label_path, label.shape, label_affine)
    return image, image_affine, image_header, label, label_header


def _save_all(items: Sequence[tuple]) -> None:
    """Write several NIfTI files of one case together: each ``(data, affine, header, path, dtype)``.

    All are written to temporary files first and renamed into place only when every write
    succeeded, so a failure leaves none of them.
    """
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(item[3])) for item in items]
        for (data, affine, header, _path, dtype), tmp in zip(items, tmps):
            save_nifti(data, affine, tmp, header=header, dtype=dtype)


def _check_output_dir(out, inputs: Sequence, must_be_empty: bool = False) -> Path:
    """Create the output folder ``out`` after checking that it is no input folder and, with
    ``must_be_empty``, that it is new or empty (files of an earlier run would mix in)."""
    out = Path(out)
    for folder in inputs:
        if out.resolve() == Path(folder).resolve():
            raise Flare23Error(f"{out}: output folder is an input folder; choose another so that inputs are never overwritten")
    if must_be_empty and out.is_dir():
        try:
            with os.scandir(out) as entries:
                used = next(entries, None) is not None
        except OSError as exc:
            raise Flare23Error(f"{out}: output folder is not readable ({exc.strerror or exc})") from None
        if used:
            raise Flare23Error(
                f"{out}: output folder is not empty; give a new or empty folder (files of an earlier run, e.g. the other "
                "model's cases, would mix in); nothing was written"
            )
    return ensure_output_dir(out)


# --- running cases -------------------------------------------------------------------------------
def _call_case(fn: Callable, case: str, *args):
    try:
        return fn(case, *args)
    except Flare23Error as exc:
        raise _prefixed(case, exc) from None


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="case", disable=None, file=sys.stderr)


def _run_cases(fn: Callable, jobs: Sequence[tuple], workers: int, desc: str, on_result: Callable | None = None) -> list:
    """Run ``fn(*job)`` for every job (``job[0]`` is the case name); results in job order.

    ``workers`` > 1 uses a process pool: ``fork`` where the platform has it (fast start, and it
    works from any ``__main__``: a script, stdin, a notebook), else ``spawn``. The first
    failure cancels the jobs not yet started and is raised; jobs already running finish.
    ``on_result(job, result)`` is called as each case completes (in completion order).
    """
    if not isinstance(workers, (int, np.integer)) or isinstance(workers, bool) or workers < 1:
        raise Flare23Error(f"workers must be a positive integer, got {workers!r}")
    results: list = [None] * len(jobs)
    with _progress(len(jobs), desc) as bar:
        if workers == 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                results[i] = _call_case(fn, *job)
                if on_result:
                    on_result(job, results[i])
                bar.update(1)
            return results
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=min(int(workers), len(jobs)), mp_context=ctx) as pool:
            pending = {pool.submit(_call_case, fn, *job): i for i, job in enumerate(jobs)}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        i = pending.pop(future)
                        results[i] = future.result()  # raises the case's error
                        if on_result:
                            on_result(jobs[i], results[i])
                        bar.update(1)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    return results


def _echo(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)


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


# --- roi-labels ----------------------------------------------------------------------------------
def _roi_case(case: str, label_path: Path, out_path: Path) -> int:
    from flare23.roi import roi_labels  # lazy: flare23.roi imports torch

    label, affine, header = _load_label(label_path)
    roi = roi_labels(label, str(label_path)).numpy()
    _save_all([(roi, affine, header, out_path, np.uint8)])
    return int(np.count_nonzero(roi))


def roi_labels_cli(labels: str, out: str, workers: int = 1) -> None:
    """ROI labels for the ROI extractor: organs -> 1, tumor and background -> 0.

    Args:
        labels: folder of full labels ``<case>.nii.gz``.
        out: output folder for ``<case>.nii.gz`` (uint8; must differ from ``labels``).
        workers: parallel processes.
    """
    files = index_cases(labels)
    for case, path in files.items():
        try:
            _header_geometry(path)
        except Flare23Error as exc:
            raise _prefixed(case, exc) from None
    out_dir = _check_output_dir(out, [labels])
    jobs = [(case, path, out_dir / f"{case}.nii.gz") for case, path in sorted(files.items())]
    results = _run_cases(_roi_case, jobs, workers, "roi-labels")
    print(f"wrote {len(results)} ROI labels to {out_dir} ({sum(results)} organ voxels in all)")


# --- crop ----------------------------------------------------------------------------------------
def _crop_case(case: str, image_path: Path, label_path: Path, image_out: Path, label_out: Path, margin_mm, require: bool) -> dict:
    image, affine, header, label, label_header = _load_pair(image_path, label_path)
    if isinstance(margin_mm, Mapping):  # physical directions (feet / head / in-plane), as the ROI box
        box = bbox_with_physical_margins(label > 0, affine, margin_mm)
    else:
        box = bbox_with_margin(label > 0, voxel_spacing(affine), margin_mm)
    if box is None:
        return {"kept": False, "reason": "no labelled voxel"}
    if require and not tumor_inside_organs(label):
        return {"kept": False, "reason": "tumor bounding box not inside the organ bounding box"}
    start = np.array([s.start for s in box], dtype=float)
    cropped_affine = affine.copy()
    cropped_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]  # world position of the crop's first voxel
    _save_all(
        [
            (image[box], cropped_affine, header, image_out, None),
            (label[box], cropped_affine, label_header, label_out, np.uint8),
        ]
    )
    return {"kept": True, "box": [[s.start, s.stop] for s in box], "shape": list(image[box].shape)}


def bbox_with_physical_margins(
    mask: np.ndarray, affine, margins_mm: Mapping[str, float], margins_above_mm: Mapping[str, float] | None = None
) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` widened by margins towards the ``feet``, the ``head`` and ``inplane`` (mm).

    The directions are physical and converted with ``affine`` exactly as the ROI box's margins
    (:func:`flare23.roi.physical_margin_voxels`); clamped to the array. ``None`` for an empty mask.
    ``margins_above_mm``: other margins for the sides at the higher array indices (default: the same).
    """
    from flare23.roi import physical_margin_voxels  # lazy: flare23.roi imports torch

    box = mask_box(mask)
    if box is None:
        return None
    below, above = physical_margin_voxels(affine, margins_mm)
    if margins_above_mm is not None:
        above = physical_margin_voxels(affine, margins_above_mm)[1]
    lo = np.array([s.start for s in box]) - below
    hi = np.array([s.stop for s in box]) + above
    return tuple(slice(int(max(0, a)), int(min(n, b))) for a, b, n in zip(lo, hi, mask.shape))


#: ``flare23 crop --model``: whether the paper's case selection (:func:`tumor_inside_organs`) is applied.
CROP_SELECTION = {"organ": False, "tumor": True}


def _crop_model(model, require_tumor_in_organs=None) -> bool:
    """The selection of ``--model`` (``organ`` or ``tumor``); a missing or other value, or a
    ``--require_tumor_in_organs`` (the former switch) that contradicts it, is a one-line error."""
    require = require_tumor_in_organs
    if require is not None and not isinstance(require, bool):
        flag = str(require).strip().lower()
        if flag not in ("true", "false"):
            raise Flare23Error(f"crop: --require_tumor_in_organs {require!r}: expected true or false (better: leave it out)")
        require = flag == "true"
    if model is None:
        hint = (
            f"; --require_tumor_in_organs {str(require).lower()} is --model {'tumor' if require else 'organ'}"
            if require is not None
            else ""
        )
        raise Flare23Error(
            "crop: --model is required: organ (every labelled case, for organ_seg) or tumor (only cases whose tumor bounding "
            f"box lies inside the organ bounding box, for tumor_seg; METHOD.md section 2){hint}"
        )
    if not isinstance(model, str) or model not in CROP_SELECTION:
        raise Flare23Error(f"crop: --model {model!r}: expected one of {', '.join(CROP_SELECTION)}")
    if require is not None and require != CROP_SELECTION[model]:
        raise Flare23Error(
            f"crop: --require_tumor_in_organs {str(require).lower()} contradicts --model {model} (the selection is "
            f"{'on' if CROP_SELECTION[model] else 'off'} for it); give --model alone"
        )
    return CROP_SELECTION[model]


def crop_cli(
    images: str,
    labels: str,
    out: str,
    model: str | None = None,
    margin_mm: float | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 1,
    require_tumor_in_organs: bool | None = None,
) -> None:
    """Crop images and labels to the bounding box of the labels (> 0) plus a margin, for one fine model.

    Args:
        images: folder of ``<case>_0000.nii.gz``.
        labels: folder of ``<case>.nii.gz`` (the same grid as the images).
        out: a new or empty output folder (a non-empty one is refused, so that the cases of an
            earlier crop, e.g. the other model's, never mix in); writes ``out/imagesTr/<case>_0000.nii.gz``
            and ``out/labelsTr/<case>.nii.gz`` with the affine shifted so that every voxel keeps its
            world position, and ``out/datalist.json`` (MONAI datalist of the cropped cases, paths
            relative to ``out``, which the bundles' ``--dataset_dir out`` reads).
        model: required, ``organ`` or ``tumor``, the fine model the crops are for (METHOD.md
            section 2). With ``organ`` every case with a labelled voxel is kept; with ``tumor`` the
            paper's selection applies as well and keeps only cases whose tumor bounding box lies
            inside the organ bounding box (cases without tumor are kept). Crop once per model, into
            separate folders (``data/flare23_organ``, ``data/flare23_tumor``).
        margin_mm: margin around the box in mm on every side, converted per axis with the voxel
            spacing (rounded up). Default: the largest training context of the fine models
            (``flare23.constants.CONTEXT_MARGINS_MM``: 120 mm towards the feet, 60 mm towards the
            head, 30 mm in-plane, physical directions), so that their context augmentation
            (``RandRoiContextCropd``) can show them what the ROI box gives at inference.
        validation_fraction: share of the cropped cases put in the datalist's ``validation``
            (hash of the case name and ``seed``, as ``flare23 datalist`` and ``split_cases`` do).
        seed: seed of the split.
        workers: parallel processes.
        require_tumor_in_organs: the former switch of the selection, accepted only where it agrees
            with ``model`` (``true`` with ``tumor``, ``false`` with ``organ``); a contradiction is an error.

    Cases without any labelled voxel and cases rejected by the selection are skipped and listed;
    they get no file and no datalist entry. No case left is an error.
    """
    require = _crop_model(model, require_tumor_in_organs)
    split_cases([], validation_fraction, seed)  # validates the options before any work
    pairs = _pair_folders(images, labels, True, "image", "label")
    if margin_mm is None:
        margin_mm = {k: float(hi) for k, (_lo, hi) in CONTEXT_MARGINS_MM.items()}
    else:
        spacing_margin_voxels((1.0, 1.0, 1.0), margin_mm)  # validates the option before any work
    _check_headers(pairs)
    out = _check_output_dir(out, [images, labels], must_be_empty=True)
    image_dir = _check_output_dir(out / "imagesTr", [images, labels])
    label_dir = _check_output_dir(out / "labelsTr", [images, labels])
    jobs = [
        (case, img, lbl, image_dir / f"{case}{IMAGE_SUFFIX}.nii.gz", label_dir / f"{case}.nii.gz", margin_mm, require)
        for case, img, lbl in pairs
    ]

    def report(job, info):
        if info["kept"]:
            _echo(f"{job[0]}: cropped to {info['box']} (shape {info['shape']})")
        else:
            _echo(f"{job[0]}: skipped ({info['reason']})")

    results = _run_cases(_crop_case, jobs, workers, "crop", report)
    kept = [job for job, r in zip(jobs, results) if r["kept"]]
    skipped = [(job[0], r["reason"]) for job, r in zip(jobs, results) if not r["kept"]]
    why = ", ".join(f"{c} ({reason})" for c, reason in skipped)
    if not kept:
        first = ", ".join(f"{c} ({reason})" for c, reason in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        raise Flare23Error(f"crop --model {model}: no case left to train on, all {len(jobs)} skipped: {first}")
    by_case = {job[0]: {"image": _relative(job[3], out), "label": _relative(job[4], out)} for job in kept}
    training, validation = split_cases(list(by_case), validation_fraction, seed)
    datalist = out / "datalist.json"
    atomic_write_json(datalist, {"training": [by_case[c] for c in training], "validation": [by_case[c] for c in validation]})
    if skipped:
        print(f"skipped {len(skipped)}: {why}")
    print(
        f"cropped {len(kept)} of {len(jobs)} cases for the {model} model into {out}; "
        f"datalist: {len(training)} training, {len(validation)} validation cases -> {datalist}"
    )


# --- fingerprint ---------------------------------------------------------------------------------
def _fingerprint_case(case: str, image_path: Path, label_path: Path, n: int, seed: int, index: int) -> np.ndarray:
    image, _, _, label, _ = _load_pair(image_path, label_path)
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image[label > 0])):
        raise Flare23Error(f"{image_path}: NaN or infinite intensities in the foreground")
    return sample_foreground(image, label, n, case_rng(seed, index))


def fingerprint_cli(images: str, labels: str, out: str, samples: int = 10_000_000, seed: int = 1234, workers: int = 1) -> None:
    """CT normalisation fingerprint (METHOD.md section 2) -> JSON read by the bundle configs.

    Args:
        images: folder of ``<case>_0000.nii.gz``.
        labels: folder of ``<case>.nii.gz``; foreground is label > 0.
        out: JSON file to write (an existing folder gets ``fingerprint.json`` inside).
        samples: foreground intensities sampled in all; each of the n cases gives ``samples // n``
            (nnU-Net v2's scheme, see :func:`intensity_fingerprint`).
        seed: seed of the per-case generators (case i, in sorted case order, uses :func:`case_rng`).
        workers: parallel processes.

    Writes ``clip_low`` / ``clip_high`` (0.5 / 99.5 percentiles), ``mean``, ``std``, ``median``,
    ``min``, ``max``, ``percentile_00_5``, ``percentile_99_5``, ``n_cases``, ``n_voxels``, ``seed``
    and ``samples_per_case``: the flat format of :func:`flare23.io.read_fingerprint`.
    """
    pairs = _pair_folders(images, labels, True, "image", "label")
    per_case = _samples_per_case(samples, len(pairs))
    out = Path(out)
    if out.is_dir():
        out = out / "fingerprint.json"
    if out.suffix != ".json":
        raise Flare23Error(f"{out}: the fingerprint must be a .json file")
    _check_headers(pairs)
    ensure_output_dir(out.parent)
    jobs = [(case, img, lbl, per_case, int(seed), i) for i, (case, img, lbl) in enumerate(pairs)]
    pooled = _run_cases(_fingerprint_case, jobs, workers, "fingerprint")
    stats = fingerprint_stats(np.concatenate(pooled), len(pairs))
    stats.update({"seed": int(seed), "samples_per_case": per_case})
    atomic_write_json(out, stats)
    print(
        f"fingerprint of {len(pairs)} cases ({stats['n_voxels']} sampled foreground voxels) -> {out}: "
        f"clip [{stats['clip_low']:.2f}, {stats['clip_high']:.2f}], mean {stats['mean']:.2f}, std {stats['std']:.2f}"
    )


# --- datalist ------------------------------------------------------------------------------------
def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(path).absolute(), base.absolute())).as_posix()


def make_datalist(
    images, labels=None, base_dir=None, validation_fraction: float = 0.2, seed: int = 0, check: bool = True
) -> dict:
    """MONAI datalist dict for the images (and labels) folders, paths relative to ``base_dir``.

    With labels: ``{"training": [...], "validation": [...]}`` of ``{"image", "label"}`` split by
    :func:`split_cases`; every image needs its label and vice versa. Without labels:
    ``{"testing": [{"image"}...]}``. ``check`` reads every header (not the voxel data) to
    verify 3D shapes and that image and label grids match.
    """
    base_dir = Path(base_dir) if base_dir is not None else Path(images).absolute().parent
    if labels is None:
        files = index_cases(images, images=True)
        if check:
            for case, path in files.items():
                try:
                    _header_geometry(path)
                except Flare23Error as exc:
                    raise _prefixed(case, exc) from None
        return {"testing": [{"image": _relative(files[c], base_dir)} for c in sorted(files)]}
    pairs = _pair_folders(images, labels, True, "image", "label")
    if check:
        _check_headers(pairs)
    by_case = {case: {"image": _relative(img, base_dir), "label": _relative(lbl, base_dir)} for case, img, lbl in pairs}
    training, validation = split_cases(list(by_case), validation_fraction, seed)
    return {"training": [by_case[c] for c in training], "validation": [by_case[c] for c in validation]}


def datalist_cli(
    images: str, labels: str | None = None, out: str | None = None, validation_fraction: float = 0.2, seed: int = 0
) -> None:
    """Write a MONAI datalist JSON (``monai.data.load_decathlon_datalist`` reads it).

    Args:
        images: folder of ``<case>_0000.nii.gz`` (e.g. ``imagesTr``).
        labels: folder of ``<case>.nii.gz`` (e.g. ``labelsTr``); without it, an image-only
            ``testing`` list is written.
        out: JSON file (default ``<images>/../datalist.json``); paths inside are relative to its folder.
        validation_fraction: share of cases put in ``validation``, chosen by a hash of the case name
            and ``seed`` (adding cases does not move existing ones; see :func:`split_cases`).
        seed: seed of the split.
    """
    out = Path(out) if out is not None else Path(images).absolute().parent / "datalist.json"
    if out.is_dir():
        out = out / "datalist.json"
    if out.suffix != ".json":
        raise Flare23Error(f"{out}: the datalist must be a .json file")
    split_cases([], validation_fraction, seed)  # validates the option before reading anything
    data = make_datalist(images, labels, out.parent, validation_fraction, seed)
    ensure_output_dir(out.parent)
    atomic_write_json(out, data)
    if labels is None:
        print(f"datalist of {len(data['testing'])} test images -> {out}")
    else:
        print(f"datalist: {len(data['training'])} training, {len(data['validation'])} validation cases -> {out}")


__all__ = [
    "bbox_with_margin",
    "bbox_with_physical_margins",
    "box_inside",
    "case_rng",
    "CROP_SELECTION",
    "crop_cli",
    "datalist_cli",
    "fingerprint_cli",
    "fingerprint_stats",
    "intensity_fingerprint",
    "make_datalist",
    "merge_labels",
    "merge_labels_cli",
    "roi_labels_cli",
    "sample_foreground",
    "split_cases",
    "split_score",
    "tumor_inside_organs",
]
