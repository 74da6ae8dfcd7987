"""Time the training configs' elastic deformation: MONAI's ``Rand3DElasticd`` against ``flare23.models.transforms.RandElastic3Dd``.

    python bench/bench_elastic.py [--patch 96,96,48] [--samples 40] [--repeats 5] [--threads 1]

Both get the same image (float32) + label (uint8) patch and the configs' settings (sigma 9-13, magnitude
0-900, bilinear / nearest, zero padding), in the same process, at three probabilities:

* ``prob 0``: the cost of a call that does not deform (MONAI resamples through an identity grid);
* ``prob 0.2``: the configs' setting, what a data-loader worker pays per patch on average;
* ``prob 1``: the cost of a deformation (full-resolution Gaussian vs coarse grid + trilinear upsampling).

Prints, per setting, the median over ``--repeats`` of the mean milliseconds per patch over ``--samples``
calls, the ratio MONAI / ours, the displacement standard deviation of both at ``prob 1`` (the
statistics must agree; ``tests/test_transforms.py`` asserts it), and the hardware.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from bench_evaluate import hardware  # noqa: E402  (bench/ is on sys.path when run as a script)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from monai.networks.layers import GaussianFilter  # noqa: E402
from monai.transforms import Rand3DElasticd  # noqa: E402

from flare23.models.transforms import RandElastic3Dd  # noqa: E402

SIGMA, MAGNITUDE = (9.0, 13.0), (0.0, 900.0)


def _patch(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand((1, *shape), generator=g)
    label = (torch.rand((1, *shape), generator=g) * 15).to(torch.uint8)
    return {"image": image, "label": label}


def _make(kind, prob, seed):
    kw = dict(
        keys=["image", "label"],
        sigma_range=SIGMA,
        magnitude_range=MAGNITUDE,
        prob=prob,
        mode=["bilinear", "nearest"],
        padding_mode="zeros",
    )
    t = Rand3DElasticd(**kw) if kind == "monai" else RandElastic3Dd(**kw)
    t.set_random_state(seed)
    return t


def _time(kind, prob, shape, samples, repeats):
    runs = []
    data = _patch(shape)
    for r in range(repeats):
        t = _make(kind, prob, seed=r)
        start = time.perf_counter()
        for _ in range(samples):
            t(data)
        runs.append((time.perf_counter() - start) / samples * 1000)
    return statistics.median(runs), runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", default="96,96,48", help="patch size x,y,z (default: the GPU run's 96,96,48)")
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a data-loader worker has 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.patch.split(","))
    print(f"patch {shape}, {args.samples} calls x {args.repeats} repeats, torch threads {args.threads}")
    print(f"hardware: {hardware()}, torch {torch.__version__}")
    print("| prob | MONAI Rand3DElasticd ms/patch | RandElastic3Dd ms/patch | ratio |")
    print("|---|---|---|---|")
    for prob, samples in ((0.0, args.samples), (0.2, args.samples), (1.0, max(4, args.samples // 4))):
        m, _ = _time("monai", prob, shape, samples, args.repeats)
        o, _ = _time("ours", prob, shape, samples, args.repeats)
        ratio = f"{m / o:.1f}x" if o >= 0.5 else "input returned untouched"
        print(f"| {prob} | {m:.1f} | {o:.1f} | {ratio} |")
    # the displacement both draw at prob 1 (magnitude fixed to 1): standard deviations must agree
    stds = {"monai": [], "ours": []}
    for seed in range(6):
        ours = RandElastic3Dd(["image"], (11.0, 11.0), (1.0, 1.0), prob=1.0)
        ours.set_random_state(seed)
        ours.randomize(shape)
        stds["ours"].append(ours.displacement(shape).std().item())
        mon = Rand3DElasticd(["image"], (11.0, 11.0), (1.0, 1.0), prob=1.0)
        mon.set_random_state(seed)
        mon.randomize(None)
        mon.rand_3d_elastic.randomize(shape)
        field = GaussianFilter(3, sigma=mon.rand_3d_elastic.sigma, truncated=3.0)(
            torch.as_tensor(mon.rand_3d_elastic.rand_offset)[None]
        )[0]
        stds["monai"].append(field.std().item())
    sm, so = statistics.mean(stds["monai"]), statistics.mean(stds["ours"])
    print(f"displacement std at sigma 11, magnitude 1 (6 draws): MONAI {sm:.5f}, ours {so:.5f} (ratio {so / sm:.3f})")
    return 0 if 0.85 < so / sm < 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
