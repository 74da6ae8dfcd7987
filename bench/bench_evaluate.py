"""Time ``flare23.evaluation.metrics.evaluate_case`` against DeepMind's ``surface-distance`` on a CT-sized case.

    python bench/bench_evaluate.py [--slices 300] [--repeats 3] [--seed 0] [--monai]

Builds a synthetic 512 x 512 x SLICES reference with the 14 FLARE classes (noisy ellipsoids for the
organs, tubes along the third axis for aorta, IVC and esophagus, a lesion in the liver) at
0.8 x 0.8 x 2.5 mm, and a prediction made by perturbing every structure (shift, scale, other
boundary noise). Then, in the same process, it times

* ours: ``evaluate_case(ref, pred, spacing)`` (all 14 classes, every FLARE rule);
* independent: the organisers' per-class loop on top of ``surface-distance`` (full-volume masks,
  ``compute_dice_coefficient``, slab restriction, cut-off, ``compute_surface_distances`` +
  ``compute_surface_dice_at_tolerance``);
* with ``--monai``: MONAI's ``compute_surface_dice(use_subvoxels=True, spacing=...)`` for the NSD
  only, on the same per-class crops that ours uses (so only the surface-Dice kernel is compared).

Reports the median of ``--repeats`` runs of each, their ratio, the hardware, and checks that all
14 DSC / NSD values agree to 1e-6 (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flare23.constants import FOREGROUND_IDS, LABEL_KEYS, NSD_DSC_CUTOFF, NSD_TOLERANCE_MM, SLAB_RESTRICTED_IDS  # noqa: E402
from flare23.evaluation.metrics import evaluate_case  # noqa: E402

SPACING = (0.8, 0.8, 2.5)

# centre (fractions of x, y, z extent), semi-axes in mm (x, y, z), for the 11 blob-like classes
ORGANS = {
    1: ((0.35, 0.45, 0.55), (85, 75, 80)),  # liver
    2: ((0.33, 0.62, 0.40), (28, 30, 50)),  # right kidney
    3: ((0.70, 0.62, 0.60), (40, 45, 50)),  # spleen
    4: ((0.55, 0.52, 0.50), (55, 12, 15)),  # pancreas
    7: ((0.42, 0.60, 0.62), (10, 6, 18)),  # right adrenal
    8: ((0.60, 0.60, 0.62), (10, 6, 18)),  # left adrenal
    9: ((0.40, 0.35, 0.48), (15, 15, 30)),  # gallbladder
    11: ((0.62, 0.35, 0.62), (55, 40, 45)),  # stomach
    12: ((0.48, 0.42, 0.42), (35, 15, 20)),  # duodenum
    13: ((0.67, 0.62, 0.40), (28, 30, 50)),  # left kidney
    14: ((0.30, 0.42, 0.58), (18, 16, 20)),  # tumor (drawn last, inside the liver)
}
# centre (x, y fractions), radius mm, z extent (fractions) for the tubes along the third axis
TUBES = {5: ((0.52, 0.60), 12, (0.05, 0.95)), 6: ((0.45, 0.60), 11, (0.10, 0.80)), 10: ((0.52, 0.64), 8, (0.55, 1.0))}


def _ellipsoid(label_map, label, centre_vox, semi_mm, rng, noise):
    semi_vox = np.asarray(semi_mm) / np.asarray(SPACING)
    lo = np.maximum(np.floor(centre_vox - semi_vox * 1.3).astype(int), 0)
    hi = np.minimum(np.ceil(centre_vox + semi_vox * 1.3).astype(int) + 1, label_map.shape)
    if np.any(hi <= lo):
        return
    grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    r2 = sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre_vox, semi_vox))
    field = ndimage.gaussian_filter(rng.standard_normal(r2.shape).astype(np.float32), (6, 6, 2))
    field *= noise / (field.std() + 1e-9)
    inside = r2 + field < 1.0
    sub = label_map[tuple(slice(a, b) for a, b in zip(lo, hi))]
    sub[inside] = label


def _tube(label_map, label, centre_xy, radius_mm, z_frac, shift_vox=(0.0, 0.0)):
    nx, ny, nz = label_map.shape
    cx, cy = centre_xy[0] * nx + shift_vox[0], centre_xy[1] * ny + shift_vox[1]
    z0, z1 = int(z_frac[0] * nz), int(z_frac[1] * nz)
    x, y = np.ogrid[:nx, :ny]
    disc = ((x - cx) * SPACING[0]) ** 2 + ((y - cy) * SPACING[1]) ** 2 <= radius_mm**2
    label_map[:, :, z0:z1][disc] = label


def make_case(slices: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference and perturbed prediction, both uint8 512 x 512 x ``slices``."""
    shape = (512, 512, slices)
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for label, (centre_xy, radius, z_frac) in TUBES.items():
        _tube(ref, label, centre_xy, radius, z_frac)
        _tube(
            pred,
            label,
            centre_xy,
            radius * rng.uniform(0.85, 1.15),
            (z_frac[0] - 0.03, min(z_frac[1] + 0.03, 1.0)),
            rng.normal(0, 1.5, 2),
        )
    for label, (centre, semi) in ORGANS.items():
        centre_vox = np.asarray(centre) * np.asarray(shape)
        _ellipsoid(ref, label, centre_vox, semi, rng, noise=0.25)
        shift = rng.normal(0, 2.0, 3) / np.asarray(SPACING)  # about 2 mm
        scale = rng.uniform(0.92, 1.08, 3)
        _ellipsoid(pred, label, centre_vox + shift, np.asarray(semi) * scale, rng, noise=0.25)
    return ref, pred


def organisers_loop(ref, pred, spacing, cutoff=NSD_DSC_CUTOFF):
    """The FLARE organisers' per-class loop, on surface-distance (the independent implementation)."""
    import surface_distance as sd

    out = {}
    for c in FOREGROUND_IDS:
        g, p = ref == c, pred == c
        if g.sum() == 0 and p.sum() == 0:
            out[c] = (1.0, 1.0)
        elif g.sum() == 0 or p.sum() == 0:
            out[c] = (0.0, 0.0)
        else:
            if c in SLAB_RESTRICTED_IDS:
                z = np.where(g)[2]
                g, p = g[:, :, z.min() : z.max()], p[:, :, z.min() : z.max()]
            d = sd.compute_dice_coefficient(g, p)
            n = (
                0.0
                if d < cutoff
                else sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(g, p, spacing), NSD_TOLERANCE_MM[c])
            )
            out[c] = (float(d), float(n))
    return out


def monai_nsd(ref, pred, spacing):
    """MONAI's surfel-based surface Dice on the per-class crops that evaluate_case uses (NSD only)."""
    import torch
    from monai.metrics import compute_surface_dice

    out = {}
    boxes_r, boxes_p = ndimage.find_objects(ref, 14), ndimage.find_objects(pred, 14)
    for c in FOREGROUND_IDS:
        br, bp = boxes_r[c - 1], boxes_p[c - 1]
        if br is None or bp is None:
            continue
        box = [slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(br, bp)]
        if c in SLAB_RESTRICTED_IDS:
            box[2] = slice(max(box[2].start, br[2].start), min(box[2].stop, br[2].stop - 1))
        g, p = ref[tuple(box)] == c, pred[tuple(box)] == c

        def onehot(m):
            return torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))

        out[c] = float(
            compute_surface_dice(
                onehot(p),
                onehot(g),
                class_thresholds=[NSD_TOLERANCE_MM[c]],
                include_background=False,
                spacing=list(spacing),
                use_subvoxels=True,
            )
        )
    return out


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, result


def hardware() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = "n/a"
    import scipy

    return f"{cpu}, {cores} usable cores ({os.cpu_count()} online), torch threads {threads}, numpy {np.__version__}, scipy {scipy.__version__}, Python {platform.python_version()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--monai", action="store_true", help="also time MONAI's SurfaceDice (NSD kernel only)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # surface-distance's scipy aliases
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI's deprecated get_mask_edges argument

    print(f"hardware: {hardware()}")
    t = time.perf_counter()
    ref, pred = make_case(args.slices, args.seed)
    print(f"case: 512 x 512 x {args.slices}, spacing {SPACING} mm, built in {time.perf_counter() - t:.1f} s; "
          f"labels present: ref {[int(v) for v in np.unique(ref) if v]}, pred {[int(v) for v in np.unique(pred) if v]}")  # fmt: skip

    evaluate_case(ref[:64, :64, :8], pred[:64, :64, :8], SPACING)  # warm-up: lookup table, imports
    t_ours, all_ours, ours = timed(lambda: evaluate_case(ref, pred, SPACING), args.repeats)
    t_sd, all_sd, theirs = timed(lambda: organisers_loop(ref, pred, SPACING), args.repeats)
    t_monai = None
    if args.monai:
        import torch

        torch.set_num_threads(1)
        monai_nsd(ref[:64, :64, :8], pred[:64, :64, :8], SPACING)
        t_monai, _, mon = timed(lambda: monai_nsd(ref, pred, SPACING), args.repeats)

    print(
        f"\n{'class':<22} {'DSC ours':>9} {'DSC s-d':>9} {'NSD ours':>9} {'NSD s-d':>9}"
        + (f" {'NSD MONAI':>10}" if args.monai else "")
    )
    worst = 0.0
    worst_monai = 0.0
    for c in FOREGROUND_IDS:
        (d1, n1), (d2, n2) = ours[c], theirs[c]
        worst = max(worst, abs(d1 - d2), abs(n1 - n2))
        line = f"{LABEL_KEYS[c]:<22} {d1:9.6f} {d2:9.6f} {n1:9.6f} {n2:9.6f}"
        if args.monai:
            m = mon.get(c)
            if m is not None and n1 > 0:
                worst_monai = max(worst_monai, abs(m - n1))
            line += f" {m:10.6f}" if m is not None else f" {'-':>10}"
        print(line)
    print(f"\nmax |ours - surface-distance| over 14 DSC and 14 NSD: {worst:.2e}")
    print(f"evaluate_case (ours)        median {t_ours:7.2f} s  runs {[round(x, 2) for x in all_ours]}")
    print(f"surface-distance loop       median {t_sd:7.2f} s  runs {[round(x, 2) for x in all_sd]}")
    if t_monai is not None:
        print(
            f"MONAI SurfaceDice (crops)   median {t_monai:7.2f} s  (NSD only; max |MONAI - ours| {worst_monai:.2e} where NSD > 0)"
        )
    print(f"speed-up: surface-distance / ours = {t_sd / t_ours:.2f}x")
    ok = worst <= 1e-6 and t_ours <= t_sd
    print("OK" if ok else "FAILED: values differ or ours is slower")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
