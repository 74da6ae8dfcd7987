"""How often each tumor lesion is in a training patch: voxel-centred (MONAI) against lesion-balanced centres.

    python bench/bench_lesion_exposure.py [--size small] [--cases 40] [--patch 64,64,32] [--spacing 2.75,2.75,4.0]
                                          [--draws 200] [--power 1.0] [--seed 31]

Generates ``--cases`` phantoms (``flare23.tools.phantoms``, 85 % with tumors) in a temporary folder and builds the
tumor_seg bundle's training transforms from its ``train.json`` (cached part: load, RAS, resampling,
normalisation, class indices, lesion weights; then the context crop and the patch selection of the random
part). For every case with a tumor it draws ``--draws`` patches twice from the same seed: with the
shipped default (``crop_balance_classes`` [], a tumor-centred patch is centred on a tumor voxel drawn
uniformly, so lesions are drawn in proportion to their volume) and with ``crop_balance_classes`` [14]
(``flare23.models.sampling.ClassComponentWeightsd``: each lesion equally often, ``--power`` 1). Lesions are the
26-connected components of label 14 on the resampled grid.

Prints, per lesion-size bin: the share of that case's patches that hold any voxel of the lesion and the
share that hold it in the patch's central half (per axis), for both draws; how many lesions share a case
(balancing acts only among the lesions of one case: the case itself is drawn uniformly by the data
loader, so a lesion alone in its case gets the same patches either way); the random part's cost per patch
(context crop + selection, median over cases); and the hardware. Patch selection also matters only where a
patch covers a small part of the scan: on the ``small`` phantoms a 64 x 64 x 32 patch at 2.75 x 2.75 x
4 mm covers most of the abdomen; ``--size full`` with the bundle's own patch and spacing is closer to CT.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_evaluate import hardware  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BINS = ((0, 100, "< 100"), (100, 500, "100-499"), (500, 10**12, ">= 500"))


def _transforms(data: Path, patch, spacing, power: float):
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "tumor_seg" / "configs" / "train.json"))
    for key, value in {
        "dataset_dir": str(data),
        "datalist": str(data / "datalist.json"),
        "patch_size": list(patch),
        "target_spacing": list(spacing),
        "crop_balance_classes": [14],
        "crop_balance_power": power,
    }.items():
        parser[key] = value
    det = Compose(parser.get_parsed_content("train#deterministic_transforms"))
    context, select = parser.get_parsed_content("train#random_transforms")[:2]
    return det, context, select, parser.get_parsed_content("train#datalist")


def _draw(case, lesions, n, context, select, patch, balanced: bool, seed: int):
    """Per lesion: share of patches holding it, and holding it in the central half; ms per patch."""
    context.set_random_state(seed)
    select.set_random_state(seed + 1)
    k = int(lesions.max())
    held, central = np.zeros(k + 1), np.zeros(k + 1)
    start = time.perf_counter()
    for _ in range(n):
        d = dict(case)
        if not balanced:
            d.pop("label_cls_weights")
        select(context(d))
        box, centre = context.last_box, [int(c) for c in select.cropper.centers[0]]
        sub = lesions[box] if box is not None else lesions
        lo = [c - p // 2 for c, p in zip(centre, patch)]
        window = sub[tuple(slice(max(a, 0), a + p) for a, p in zip(lo, patch))]
        middle = sub[tuple(slice(max(a + p // 4, 0), a + p - p // 4) for a, p in zip(lo, patch))]
        held[np.unique(window)] += 1
        central[np.unique(middle)] += 1
    ms = (time.perf_counter() - start) / n * 1000
    return held[1:] / n, central[1:] / n, ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=["small", "full"])
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--patch", default="64,64,32", help="patch x,y,z (default: the CPU phantom runs')")
    ap.add_argument("--spacing", default="2.75,2.75,4.0", help="target spacing x,y,z mm (default: the CPU phantom runs')")
    ap.add_argument("--draws", type=int, default=200, help="patches per case and mode")
    ap.add_argument("--power", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--slices", type=int, default=None, help="slices of a full phantom (default: the generator's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from skimage.measure import label as components

    from flare23.tools.phantoms.generate import generate_phantoms

    patch = tuple(int(v) for v in args.patch.split(","))
    spacing = tuple(float(v) for v in args.spacing.split(","))
    rows = {mode: {name: [[], []] for *_, name in BINS} for mode in ("voxel", "balanced")}
    per_case = []
    cost = {"voxel": [], "balanced": []}
    n_cases = 0
    with tempfile.TemporaryDirectory(prefix="bench_exposure_") as tmp:
        data = Path(tmp)
        generate_phantoms(
            data,
            cases=args.cases,
            seed=args.seed,
            size=args.size,
            tumor_fraction=0.85,
            validation_fraction=0.0,
            slices=args.slices,
        )
        det, context, select, datalist = _transforms(data, patch, spacing, args.power)
        for i, entry in enumerate(datalist):
            case = det(dict(entry))
            lesions = components(np.asarray(case["label"][0]) == 14, connectivity=3)
            if lesions.max() == 0:
                continue
            n_cases += 1
            sizes = np.bincount(lesions.ravel())[1:]
            per_case.append(len(sizes))
            for mode in ("voxel", "balanced"):
                held, central, ms = _draw(case, lesions, args.draws, context, select, patch, mode == "balanced", 1000 * i)
                cost[mode].append(ms)
                for size, h, c in zip(sizes, held, central):
                    name = next(name for lo, hi, name in BINS if lo <= size < hi)
                    for store, value in zip(rows[mode][name], (h, c)):
                        store.append(value)
    print(
        f"tumor_seg patch selection, {n_cases} {args.size} phantoms with tumors (seed {args.seed}), patch {patch} at "
        f"{spacing} mm, {args.draws} patches per case and mode, power {args.power}"
    )
    print(f"hardware: {hardware()}, torch {torch.__version__}")
    counts = np.bincount(per_case)
    print(
        f"lesions per case: mean {np.mean(per_case):.2f}; cases with 1, 2, 3+ lesions: {counts[1] if len(counts) > 1 else 0}, "
        f"{counts[2] if len(counts) > 2 else 0}, {int(counts[3:].sum())}"
    )
    print("| lesion voxels (resampled) | lesions | in patch: voxel / balanced | in the patch's central half |")
    print("|---|---|---|---|")
    for *_, name in BINS:
        v, b = rows["voxel"][name], rows["balanced"][name]
        if not v[0]:
            continue
        cells = [f"{np.mean(v[j]):.3f} / {np.mean(b[j]):.3f}" for j in range(2)]
        print(f"| {name} | {len(v[0])} | " + " | ".join(cells) + " |")
    mv, mb = statistics.median(cost["voxel"]), statistics.median(cost["balanced"])
    print(f"context crop + selection per patch, median over cases: voxel {mv:.2f} ms, balanced {mb:.2f} ms ({mb / mv:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
