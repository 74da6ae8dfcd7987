"""Engines with trained weights: labels and DSC of OpenVINO fp32 and int8 against PyTorch (issue 23, items 1-2).

    python bench/bench_engine_accuracy.py --checkpoints DIR --heldout IMAGES --labels LABELS --calibration_scans SCANS
        [--real ../shared/data/real_ct/ts_example_ct/ct.nii.gz] [--windows 32] [--threads 2] [--work /tmp/engine_acc]

``--checkpoints`` holds ``roi_extractor/model.pt``, ``organ_seg/model.pt`` and ``tumor_seg/model.pt`` (a training's
outputs, e.g. ``flare23 quickstart``'s ``checkpoints/``; their settings travel with them). Steps, each with the
project's own commands:

1. ``flare23 calibrate CALIBRATION_SCANS --out WORK/calibration --windows N`` (training scans, not the held-out ones);
2. ``flare23 segment`` of the held-out images with ``--engine torch --precision fp32``, ``--engine openvino
   --precision fp32`` and ``--engine openvino --precision int8``;
3. ``flare23 evaluate`` of each against the labels (FLARE 2023 DSC / NSD);
4. with ``--real``: the three engines on a whole real CT, voxel agreement with PyTorch.

Prints a Markdown table: mean organ and tumor DSC per engine, the difference to PyTorch, and the share of voxels
labelled as PyTorch labels them (held-out phantoms, and the real CT). Writes ``WORK/engine_accuracy.json``.
Held-out images are NIfTI files named as nnU-Net names them (``case_0000.nii.gz``: the pipeline names its output ``case.nii.gz``),
labels ``case.nii.gz``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ENGINES = {
    "torch fp32": ["--engine", "torch", "--precision", "fp32"],
    "openvino fp32": ["--engine", "openvino", "--precision", "fp32"],
    "openvino int8": ["--engine", "openvino", "--precision", "int8"],
}


def flare23(*args: str, threads: int) -> float:
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "flare23", *args], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"flare23 {' '.join(args[:1])} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def agreement(a: Path, b: Path) -> tuple[int, int]:
    x, y = np.asarray(nib.load(str(a)).dataobj), np.asarray(nib.load(str(b)).dataobj)
    return int((x == y).sum()), int(x.size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", required=True)
    ap.add_argument("--heldout", required=True, help="folder of held-out images")
    ap.add_argument("--labels", required=True, help="folder of their reference labels")
    ap.add_argument("--calibration_scans", required=True, nargs="+")
    ap.add_argument("--real", default=None)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/engine_accuracy")
    args = ap.parse_args()
    work = Path(args.work)
    ck = Path(args.checkpoints)
    weights = ["--roi_ckpt", str(ck / "roi_extractor" / "model.pt"), "--organ_ckpt", str(ck / "organ_seg" / "model.pt"),
               "--tumor_ckpt", str(ck / "tumor_seg" / "model.pt")]  # fmt: skip
    images = Path(args.heldout)
    cases = [p.name for p in sorted(Path(args.labels).glob("*.nii.gz"))]  # the outputs are named as the labels
    calibration = work / "calibration"
    seconds = {"calibrate": flare23("calibrate", *args.calibration_scans, "--out", str(calibration), "--windows", str(args.windows),
                                    *weights, threads=args.threads)}  # fmt: skip
    result = {"windows": args.windows, "threads": args.threads, "engines": {}, "seconds": seconds}
    for engine, flags in ENGINES.items():
        extra = ["--int8_calibration", str(calibration)] if "int8" in engine else []
        out = work / engine.replace(" ", "_")
        seconds[engine] = flare23("segment", "-i", str(images), "-o", str(out), *flags, *extra, *weights, threads=args.threads)
        flare23("evaluate", str(out), args.labels, str(out / "eval"), threads=args.threads)
        summary = json.loads((out / "eval" / "summary.json").read_text())
        same = [agreement(out / name, work / "torch_fp32" / name) for name in cases]
        row = {"organ_dsc": summary["organ_dsc"], "tumor_dsc": summary["tumor_dsc"],
               "voxels_as_torch": sum(s for s, _ in same) / sum(n for _, n in same)}  # fmt: skip
        if args.real:
            real = work / f"real_{engine.replace(' ', '_')}.nii.gz"
            seconds[f"real {engine}"] = flare23("segment", "-i", args.real, "-o", str(real), *flags, *extra, *weights, threads=args.threads)
            s, n = agreement(real, work / "real_torch_fp32.nii.gz")
            row["real_voxels_as_torch"] = s / n
        result["engines"][engine] = row
        print(engine, row, flush=True)
    (work / "engine_accuracy.json").write_text(json.dumps(result, indent=1))
    ref = result["engines"]["torch fp32"]
    print(f"\n{len(cases)} held-out cases, calibration on {len(args.calibration_scans)} scans, {args.windows} windows, "
          f"{args.threads} threads\n")  # fmt: skip
    print("| engine | organ DSC | vs PyTorch | tumor DSC | vs PyTorch | held-out voxels as PyTorch | real CT voxels as PyTorch |")
    print("|---|---|---|---|---|---|---|")
    for engine, r in result["engines"].items():
        real = f"{100 * r['real_voxels_as_torch']:.3f} %" if "real_voxels_as_torch" in r else "-"
        print(f"| {engine} | {r['organ_dsc']:.4f} | {r['organ_dsc'] - ref['organ_dsc']:+.4f} | {r['tumor_dsc']:.4f} | "
              f"{r['tumor_dsc'] - ref['tumor_dsc']:+.4f} | {100 * r['voxels_as_torch']:.3f} % | {real} |")  # fmt: skip


if __name__ == "__main__":
    main()
