"""Pipeline benchmark: our cascade against the unoptimised MONAI way of doing the same job.

One command (CPU now; the same script on a GPU with ``--device cuda``)::

    python bench/bench_pipeline.py [--slices 300] [--repeats 3] [--filters 8,16,32,64,64,64] [--device cpu]

On one full-size phantom (512 x 512 x SLICES, ``flare23.tools.phantoms.generate.make_phantom(size="full")``), in
one run, interleaved, each run in its own process (clean peak-memory figures):

* **ours**: the pipeline bundle (``flare23.inference.segment.run_pipeline``): ROI -> crop -> both branches
  resampled on the device -> blocked back-resampling with arg-max -> ensemble -> cc3d -> write.
* **monai**: the unoptimised MONAI way with the *same* organ and tumor networks and weights:
  ``LoadImaged`` -> ``Orientationd`` -> ``Spacingd`` on the CPU on the whole volume (no ROI crop)
  -> CT normalisation -> ``SlidingWindowInferer`` -> ``Invertd`` of the 15-channel probabilities
  -> arg-max on the CPU -> ensemble -> MONAI ``KeepLargestConnectedComponent`` -> ``SaveImage``.

Both use random weights from the same seed (speed does not depend on the values). The crop of ours
must not depend on random ROI weights: ``--roi auto`` (the default, :func:`resolve_roi`) uses the ROI
extractor's trained ``models/model.pt`` when it exists and otherwise the *oracle* box, the box of the
phantom's own labels with the method's margins; ``--roi oracle`` always takes that box and ``--roi
model`` always the ROI network's box (with random weights: an arbitrary crop). With the oracle box
the ROI network still runs and is timed, only its box is replaced.
``--engine torch|openvino|auto`` and ``--precision`` are passed to the pipeline as its ids
(:func:`engine_overrides`; ``int8`` needs ``--int8_calibration DIR`` from ``flare23 calibrate``).
Network widths come from ``--filters`` for both systems (the paper's widths make a CPU run take
tens of minutes; the ratio of everything *outside* the networks does not depend on them).

Reported: median seconds end to end, per stage, the time outside the network forward passes
(ours: total - roi - tumor_network - organ_network), peak resident memory (``ru_maxrss``), ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"


def _hardware(threads: int | None = None) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    n = threads or torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__} ({n} thread{'s' if n != 1 else ''} per run), {platform.python_version()}"


def _overrides(filters):
    return {
        "roi_overrides": {},
        "organ_overrides": {"network_def#filters": filters},
        "tumor_overrides": {"network_def#filters": filters},
    }


#: ``--roi`` values: ``auto`` = ``model`` where the ROI extractor has trained weights, else ``oracle``.
ROI_CHOICES = ("auto", "model", "oracle")
TRAINED_ROI = BUNDLES / "roi_extractor" / "models" / "model.pt"


def resolve_roi(choice: str, trained: bool) -> str:
    """``model`` or ``oracle`` for ``--roi choice``; ``auto`` takes the oracle box unless the ROI weights are ``trained``."""
    if choice not in ROI_CHOICES:
        raise ValueError(f"roi must be one of {', '.join(ROI_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return "model" if trained else "oracle"
    return choice


def engine_overrides(engine: str = "torch", precision: str = "auto", calibration: str | None = None,
                     cache: str | None = None) -> dict:  # fmt: skip
    """The pipeline ids ``engine``, ``precision`` (and ``int8_calibration``, ``engine_cache``) for one run of ours."""
    out = {"engine": str(engine), "precision": str(precision)}
    if precision == "int8":
        if engine != "openvino":
            raise ValueError(f"precision int8 runs on the OpenVINO engine, not {engine!r}")
        if not calibration:
            raise ValueError("precision int8 needs a calibration folder (flare23 calibrate SCANS --out DIR)")
        out["int8_calibration"] = str(calibration)
    if cache:
        out["engine_cache"] = str(cache)
    return out


def pipeline_overrides(work, filters, device: str = "cpu", engine: str = "torch", precision: str = "auto",
                       calibration: str | None = None, cache: str | None = None) -> dict:  # fmt: skip
    """Every pipeline id a run of ours sets: the weights in ``work`` (the trained ROI extractor's where it has one),
    the widths, the device and the engine ids (:func:`engine_overrides`); ``flare23 calibrate`` gets the same ones."""
    work = Path(work)
    roi_ckpt = TRAINED_ROI if TRAINED_ROI.is_file() else work / "roi.pt"
    return {
        "roi_ckpt": str(roi_ckpt),
        "organ_ckpt": str(work / "organ.pt"),
        "tumor_ckpt": str(work / "tumor.pt"),
        **_overrides(filters),
        "device": str(device),
        **engine_overrides(engine, precision, calibration, cache),
    }


def precision_used(engine: str, precision: str, device: str) -> tuple[str, str]:
    """The engine and precision a run of ours uses: ``auto`` resolved as the pipeline resolves it (for the tables)."""
    import torch

    from flare23.inference.cascade import cpu_has_fast_bf16
    from flare23.inference.engine import resolve_engine

    kind = torch.device(device).type
    if precision == "auto":
        precision = "fp16" if kind == "cuda" else ("bf16" if cpu_has_fast_bf16() else "fp32")
    return resolve_engine(engine, device), precision


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _random_ckpts(work: Path, filters) -> dict:
    """Organ / tumor state dicts from a fixed seed, shared by both systems."""
    import torch

    from flare23.bundles import SubBundle

    paths = {}
    for part, folder in (("organ", "organ_seg"), ("tumor", "tumor_seg")):
        torch.manual_seed(0)
        net = SubBundle(BUNDLES / folder, "inference.json", {"network_def#filters": filters}).network()
        paths[part] = work / f"{part}.pt"
        torch.save(net.state_dict(), str(paths[part]))
    return paths


# --- workers (one process each) -----------------------------------------------------------------
def worker_ours(args) -> dict:
    import csv

    import torch

    import flare23.inference.cascade as cascade
    from flare23.inference.segment import run_pipeline
    from flare23.roi.box import RoiBox

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    engine, precision = getattr(args, "engine", "torch"), args.precision
    overrides = pipeline_overrides(work, args.filters, args.device, engine, precision, getattr(args, "int8_calibration", None),
                                   getattr(args, "engine_cache", None))  # fmt: skip
    trained = TRAINED_ROI.is_file()
    roi = resolve_roi(getattr(args, "roi", "auto"), trained)
    oracle = None
    if roi == "oracle":
        b = json.loads((work / "oracle_box.json").read_text())
        oracle = RoiBox(tuple(b["start"]), tuple(b["stop"]), tuple(b["shape"]))
    boxes = []
    locate = cascade.locate

    def located(*a, **k):  # the ROI network always runs (and is timed); the oracle only replaces its box
        box = locate(*a, **k)
        box = oracle if oracle is not None else box
        boxes.append(box)
        return box

    cascade.locate = located
    out = work / "out_ours"
    t0 = time.perf_counter()
    try:
        run_pipeline(work / "in", out, **overrides)
    finally:
        cascade.locate = locate
    total = time.perf_counter() - t0
    with open(out / "timings.csv") as f:
        row = next(csv.DictReader(f))
    stages = {k: float(v) for k, v in row.items() if k not in ("case",)}
    stages["end_to_end_s"] = total
    used_engine, used_precision = precision_used(engine, precision, args.device)
    result = {"stages": stages, "peak_rss_mb": _peak_rss_mb(), "roi": roi, "roi_weights": "trained" if trained else "random",
              "engine": used_engine, "precision": used_precision}  # fmt: skip
    if boxes and boxes[0] is not None:
        crop = 1.0
        for lo, hi, n in zip(boxes[0].start, boxes[0].stop, boxes[0].shape):
            crop *= (hi - lo) / n
        result["crop_fraction"] = crop
    return result


def worker_monai(args) -> dict:
    import numpy as np
    import torch
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        KeepLargestConnectedComponent,
        LoadImaged,
        Orientationd,
        SaveImage,
        Spacingd,
    )

    from flare23.bundles import SubBundle
    from flare23.constants import KEEP_LARGEST_IDS, TUMOR_ID
    from flare23.inference.branches import branch_from_bundle
    from flare23.models.transforms import CTNormalized

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    device = torch.device(args.device)
    image_path = str(next((work / "in").iterdir()))
    times: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        r = fn()
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return r

    t_start = time.perf_counter()
    labels = {}
    for part, folder in (("tumor", "tumor_seg"), ("organ", "organ_seg")):
        sub = SubBundle(BUNDLES / folder, "inference.json", {"network_def#filters": args.filters})
        branch = branch_from_bundle(sub, part)
        net = sub.network()
        net.load_state_dict(torch.load(str(work / f"{part}.pt"), weights_only=True))
        net = net.to(device).eval()
        pre = Compose([
            LoadImaged(keys="image", image_only=False),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=branch.target_spacing, mode="bilinear", dtype=np.float32),
            CTNormalized(keys="image", clip_low=branch.clip_low, clip_high=branch.clip_high, mean=branch.mean, std=branch.std),
        ])  # fmt: skip
        data = timed(f"{part}_preprocess", lambda pre=pre: pre({"image": image_path}))
        sw = SlidingWindowInferer(roi_size=branch.patch_size, sw_batch_size=1, overlap=branch.overlap, mode="gaussian")
        with torch.inference_mode():
            x = data["image"][None].to(device)
            data["pred"] = timed(f"{part}_network", lambda x=x, net=net, sw=sw: sw(x, net)[0].cpu())
        post = Compose([
            Activationsd(keys="pred", softmax=True),
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
        ])  # fmt: skip
        data = timed(f"{part}_invert_argmax", lambda data=data, post=post: post(data))
        labels[part] = data["pred"]
        meta_image = data["image"]
    organ, tumor = labels["organ"], labels["tumor"]
    t0 = time.perf_counter()
    final = torch.where((tumor == TUMOR_ID) | (organ == TUMOR_ID), tumor, organ)
    final = KeepLargestConnectedComponent(applied_labels=list(KEEP_LARGEST_IDS), independent=True, connectivity=3)(final)
    times["ensemble_postprocess"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    SaveImage(output_dir=str(work / "out_monai"), output_postfix="seg", output_dtype=np.uint8, separate_folder=False,
              print_log=False)(final, meta_data=meta_image.meta)  # fmt: skip
    times["write"] = time.perf_counter() - t0
    times["end_to_end_s"] = time.perf_counter() - t_start
    return {"stages": times, "peak_rss_mb": _peak_rss_mb()}


# --- driver -------------------------------------------------------------------------------------
def prepare(work: Path, slices: int, seed: int, filters) -> None:
    import nibabel as nib
    import numpy as np

    from flare23.roi.box import roi_box
    from flare23.tools.phantoms.generate import make_phantom

    case = make_phantom(seed, size="full", slices=slices, orientation="RAS")
    (work / "in").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(case["image"], case["affine"]), str(work / "in" / "bench_0000.nii.gz"))
    organs = (case["label"] > 0) & (case["label"] < 14)
    box = roi_box(organs, (1, 1, 1), organs.shape, case["affine"])
    (work / "oracle_box.json").write_text(json.dumps({"start": box.start, "stop": box.stop, "shape": list(organs.shape)}))
    np.save(work / "label.npy", case["label"])
    import torch

    from flare23.bundles import SubBundle

    torch.save(SubBundle(BUNDLES / "roi_extractor", "inference.json").network().state_dict(), str(work / "roi.pt"))
    _random_ckpts(work, filters)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--filters", default="8,16,32,64,64,64")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--engine", choices=("torch", "openvino", "auto"), default="torch", help="engine of our networks")
    p.add_argument("--int8_calibration", default=None, help="folder of `flare23 calibrate` (with --precision int8)")
    p.add_argument("--roi", choices=ROI_CHOICES, default="auto", help="auto: the trained ROI model if any, else the oracle box")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--systems", default="ours,monai")
    p.add_argument("--work", default=None)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.filters = [int(v) for v in str(args.filters).split(",")]
    if args._worker:
        result = (worker_ours if args._worker == "ours" else worker_monai)(args)
        print("RESULT " + json.dumps(result))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="flare23-bench-"))
    print(f"preparing a 512 x 512 x {args.slices} phantom in {work} ...", flush=True)
    prepare(work, args.slices, args.seed, args.filters)
    systems = args.systems.split(",")
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for r in range(args.repeats):
        for system in systems:  # interleaved
            cmd = [sys.executable, __file__, "--_worker", system, "--work", str(work), "--filters", ",".join(map(str, args.filters)),
                   "--device", args.device, "--precision", args.precision, "--threads", str(args.threads), "--roi", args.roi,
                   "--engine", args.engine]  # fmt: skip
            if args.int8_calibration:
                cmd += ["--int8_calibration", args.int8_calibration]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{system} run {r + 1} failed:\n{proc.stderr[-4000:]}")
            res = json.loads(line[0][7:])
            results[system].append(res)
            print(
                f"run {r + 1} {system}: {res['stages']['end_to_end_s']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True
            )
    summary = {}
    for system, runs in results.items():
        keys = [k for k in runs[0]["stages"] if all(k in r["stages"] for r in runs)]
        med = {k: statistics.median(r["stages"][k] for r in runs) for k in keys}
        med["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)
        summary[system] = med
    print(f"\nhardware: {_hardware(args.threads)}\nphantom 512 x 512 x {args.slices}, filters {args.filters}, device {args.device}, "
          f"engine {args.engine}, precision {args.precision}, ROI {resolve_roi(args.roi, TRAINED_ROI.is_file())}, "
          f"median of {args.repeats} runs")  # fmt: skip
    for system, med in summary.items():
        print(f"\n{system}:")
        for k, v in med.items():
            print(f"  {k:<22} {v:10.2f}")
    if "ours" in summary:
        o = summary["ours"]
        net = o.get("roi", 0) + o.get("tumor_network", 0) + o.get("organ_network", 0)
        outside = o["end_to_end_s"] - net
        print(
            f"\nours: time outside the network forward passes {outside:.2f} s = {100 * outside / o['end_to_end_s']:.1f} % of the total"
        )
    if "ours" in summary and "monai" in summary:
        print(f"end-to-end ratio monai / ours: {summary['monai']['end_to_end_s'] / summary['ours']['end_to_end_s']:.2f}x; "
              f"peak RSS ours {summary['ours']['peak_rss_mb']:.0f} MB vs monai {summary['monai']['peak_rss_mb']:.0f} MB")  # fmt: skip
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {work / 'summary.json'}")


if __name__ == "__main__":
    main()
