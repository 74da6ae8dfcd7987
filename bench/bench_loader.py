"""CPU cost of one training patch of a fine bundle: the data loader's work, ours against MONAI's elastic deformation.

    python bench/bench_loader.py [--bundle tumor_seg] [--patch 96,96,48] [--spacing 2.75,2.75,4.0]
                                 [--cases 4] [--samples 60] [--repeats 3] [--threads 1]

Generates ``--cases`` small phantoms (``flare23.tools.phantoms``, all with tumors) in a temporary folder, builds the
bundle's ``train#dataset`` from its ``train.json`` (cached deterministic part: load, RAS, resampling,
normalisation, class indices), and times ``dataset[i]`` (the random part a data-loader worker runs per
patch: context crop, patch selection, rotation, scaling, elastic deformation, intensity, mirroring) for:

* ours: the config as shipped (``flare23.models.transforms.RandElastic3Dd``);
* baseline: the same config with MONAI's ``Rand3DElasticd`` (same settings) in place of it.

Prints the median over ``--repeats`` of the mean ms per patch over ``--samples`` patches, the ratio, the
patches per second one core delivers, a per-transform breakdown of ours, and the hardware. A GPU training
needs about ``batch_size x iterations/s`` patches per second from its workers.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from bench_evaluate import hardware  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _dataset(bundle: str, data: Path, patch, spacing, elastic: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
    overrides = {
        "dataset_dir": str(data),
        "datalist": str(data / "datalist.json"),
        "patch_size": list(patch),
        "target_spacing": list(spacing),
        "num_workers": 0,
        "cache_rate": 1.0,
    }
    for key, value in overrides.items():
        parser[key] = value
    randoms = parser["train"]["random_transforms"]
    found = [i for i, t in enumerate(randoms) if t["_target_"] in ("flare23.models.transforms.RandElastic3Dd", "Rand3DElasticd")]
    if len(found) != 1:
        raise SystemExit(f"{bundle}: expected one elastic transform in train#random_transforms, found {len(found)}")
    randoms[found[0]]["_target_"] = elastic
    return parser.get_parsed_content("train#dataset"), parser.get_parsed_content("train#random_transforms")


def _time(ds, samples: int, repeats: int, seed0: int = 0):
    runs = []
    for r in range(repeats):
        ds.transform.set_random_state(seed0 + r)  # the same draws for ours and the baseline up to the elastic step
        start = time.perf_counter()
        for k in range(samples):
            ds[k % len(ds)]
        runs.append((time.perf_counter() - start) / samples * 1000)
    return statistics.median(runs), runs


def _breakdown(ds, randoms, samples: int) -> Counter:
    spent = Counter()
    for k in range(samples):
        item = copy.deepcopy(ds._cache[k % len(ds)])
        for t in randoms:
            start = time.perf_counter()
            item = t(item)
            item = item[0] if isinstance(item, list) else item
            spent[type(t).__name__] += time.perf_counter() - start
    return spent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="tumor_seg", choices=["organ_seg", "tumor_seg"])
    ap.add_argument("--patch", default="96,96,48", help="patch size x,y,z (default: the GPU phantom run's)")
    ap.add_argument("--spacing", default="2.75,2.75,4.0", help="target spacing x,y,z mm (default: the phantom runs')")
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a data-loader worker has 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from flare23.tools.phantoms.generate import generate_phantoms

    patch = tuple(int(v) for v in args.patch.split(","))
    spacing = tuple(float(v) for v in args.spacing.split(","))
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        data = Path(tmp)
        generate_phantoms(data, cases=args.cases, seed=0, size="small", tumor_fraction=1.0, validation_fraction=0.0)
        ours, randoms = _dataset(args.bundle, data, patch, spacing, "flare23.models.transforms.RandElastic3Dd")
        base, _ = _dataset(args.bundle, data, patch, spacing, "Rand3DElasticd")
        m_ours, r_ours = _time(ours, args.samples, args.repeats)
        m_base, r_base = _time(base, args.samples, args.repeats)
        spent = _breakdown(ours, randoms, args.samples)
    print(
        f"bundle {args.bundle}, patch {patch} at {spacing} mm, {args.cases} small phantoms, {args.samples} patches x {args.repeats} repeats"
    )
    print(f"hardware: {hardware()}, torch {torch.__version__}")
    print("| random part per patch | median ms | runs ms | patches/s per core |")
    print("|---|---|---|---|")
    print(f"| ours (RandElastic3Dd) | {m_ours:.1f} | {', '.join(f'{v:.1f}' for v in r_ours)} | {1000 / m_ours:.1f} |")
    print(f"| baseline (MONAI Rand3DElasticd) | {m_base:.1f} | {', '.join(f'{v:.1f}' for v in r_base)} | {1000 / m_base:.1f} |")
    print(f"ratio baseline / ours: {m_base / m_ours:.2f}x")
    print(
        "ours, per transform (ms per patch, one pass): "
        + ", ".join(f"{k} {v / args.samples * 1000:.1f}" for k, v in spent.most_common())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
