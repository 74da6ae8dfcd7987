"""What every data command shares: pairing image and label folders, checking headers before anything is written, loading a case, writing its outputs atomically, running the cases (in parallel) with a progress bar."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from flare23.constants import LABELS
from flare23.errors import Flare23Error
from flare23.io import (
    atomic_path,
    check_affine,
    check_pair,
    ensure_output_dir,
    index_cases,
    load_image,
    load_nifti,
    save_nifti,
)

MAX_LABEL = max(LABELS)


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
