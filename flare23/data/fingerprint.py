"""The CT intensity fingerprint of a training set (``flare23 fingerprint``): percentiles, mean and std of foreground voxels (METHOD.md section 2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flare23.data.prepare import _check_headers, _load_pair, _pair_folders, _run_cases
from flare23.errors import Flare23Error
from flare23.io import (
    atomic_write_json,
    ensure_output_dir,
)

FINGERPRINT_PERCENTILES = (0.5, 99.5)


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
