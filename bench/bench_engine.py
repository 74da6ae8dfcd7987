"""OpenVINO fp32 and int8 against PyTorch eager, one window of each network at the paper's widths (issue 23, items 1-2).

    python bench/bench_engine.py [--repeats 3] [--threads 2] [--networks organ,tumor,roi] [--int8_windows 8] [--out bench/results]

Random weights (the speed of a convolution does not depend on its values), the bundles' windows:
organ 224 x 128 x 64 and tumor 192 x 128 x 32 (``flare23.constants``, widths 32-320), and the ROI
extractor's 128 x 128 x 80 tile (widths ``ROI_FILTERS``). Per network: the OpenVINO conversion once
(its time reported, then cached as the pipeline caches it), a warm-up call of each engine, then
``--repeats`` rounds in which torch and OpenVINO alternate (interleaved, so that a change of machine
load hits both); the median seconds per window of each and their ratio. Agreement: the share of
voxels whose arg-max label is the same, and the largest probability difference.

int8 (``--int8_windows N``, 0 = off; organ and tumor): the network quantised as ``flare23 calibrate``
does (:class:`flare23.inference.engine.OpenVinoNetwork` with ``precision="int8"``), calibrated on N
windows of a smooth random volume (the speed of int8 kernels does not depend on the values; its
accuracy does, and is measured with trained weights elsewhere), and timed in the same interleaved
rounds; its speed-up is against OpenVINO fp32.
Prints a Markdown table and writes ``engine.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flare23.constants import (
    FILTERS,
    KERNELS_XYZ,
    ORGAN_PATCH_XYZ,
    ORGAN_STRIDES_XYZ,
    ROI_PATCH_XYZ,
    TUMOR_PATCH_XYZ,
    TUMOR_STRIDES_XYZ,
)
from flare23.inference.calibrate import write_record, write_volume
from flare23.inference.engine import OpenVinoNetwork
from flare23.inference.int8 import CalibrationSet
from flare23.models.networks import ROI_FILTERS, LightUNet, NnDynUNet


def network(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "roi":
        return LightUNet(filters=ROI_FILTERS).eval(), tuple(ROI_PATCH_XYZ)
    strides, window = (ORGAN_STRIDES_XYZ, ORGAN_PATCH_XYZ) if name == "organ" else (TUMOR_STRIDES_XYZ, TUMOR_PATCH_XYZ)
    net = NnDynUNet(spatial_dims=3, in_channels=1, out_channels=15, kernel_size=KERNELS_XYZ, strides=strides,
                    upsample_kernel_size=strides[1:], filters=list(FILTERS), norm_name="instance", deep_supervision=False)  # fmt: skip
    return net.eval(), tuple(window)


def smooth_calibration(folder: Path, name: str, window, windows: int) -> CalibrationSet:
    """A calibration folder holding one smooth random volume (unit variance) big enough for ``windows`` windows."""
    from scipy.ndimage import gaussian_filter

    shape = tuple(int(w * f) for w, f in zip(window, (2, 2, 2)))
    volume = gaussian_filter(torch.randn(shape, generator=torch.Generator().manual_seed(1)).numpy(), 4)
    volume /= volume.std()
    item = write_volume(folder, name, "smooth", volume)
    write_record(folder, {"format": 1, "windows": windows, "scans": [], "branches": {name: {}}, "volumes": {name: [item]}})
    return CalibrationSet(folder)


def timed(fn, x) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn(x)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--networks", default="organ,tumor,roi")
    ap.add_argument("--int8_windows", type=int, default=8, help="calibration windows for int8 (0: no int8 column)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.networks.split(","):
        net, window = network(name)
        x = torch.randn(1, 1, *window)
        with tempfile.TemporaryDirectory() as cache:
            engine = OpenVinoNetwork(net, window, cache, name=name, threads=args.threads)
            convert = engine.convert_seconds
            int8 = None
            if args.int8_windows and name != "roi":
                calibration = smooth_calibration(Path(cache) / "calibration", name, window, args.int8_windows)
                int8 = OpenVinoNetwork(net, window, cache, name=name, threads=args.threads, precision="int8", calibration=calibration)
            with torch.inference_mode():
                eager = net
                _, ref = timed(eager, x)  # warm-up
                _, got = timed(engine, x)
                got8 = timed(int8, x)[1] if int8 else None
                t_torch, t_ov, t_int8 = [], [], []
                for _ in range(args.repeats):
                    t_torch.append(timed(eager, x)[0])
                    t_ov.append(timed(engine, x)[0])
                    if int8:
                        t_int8.append(timed(int8, x)[0])
        p_ref, p_got = torch.softmax(ref.float(), 1), torch.softmax(got, 1)
        row = {
            "network": name, "window": list(window), "torch_s": statistics.median(t_torch), "openvino_s": statistics.median(t_ov),
            "convert_s": convert, "label_agreement": (ref.argmax(1) == got.argmax(1)).float().mean().item(),
            "max_prob_diff": (p_ref - p_got).abs().max().item(), "torch_runs": t_torch, "openvino_runs": t_ov,
        }  # fmt: skip
        row["speedup"] = row["torch_s"] / row["openvino_s"]
        if int8:
            row.update(int8_s=statistics.median(t_int8), int8_runs=t_int8, int8_convert_s=int8.convert_seconds,
                       int8_label_agreement_random=(got.argmax(1) == got8.argmax(1)).float().mean().item())  # fmt: skip
            row["int8_speedup_over_openvino"] = row["openvino_s"] / row["int8_s"]
            print(f"{name}: int8 {row['int8_s']:.2f} s ({row['int8_speedup_over_openvino']:.2f}x over OpenVINO fp32), "
                  f"quantisation {int8.convert_seconds:.1f} s", flush=True)  # fmt: skip
        rows.append(row)
        print(f"{name}: torch {row['torch_s']:.2f} s, openvino {row['openvino_s']:.2f} s ({row['speedup']:.2f}x), "
              f"conversion {convert:.1f} s, labels agree on {100 * row['label_agreement']:.3f} %", flush=True)  # fmt: skip
    hw = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__}
    try:
        import openvino

        hw["openvino"] = openvino.__version__.split("-")[0]
        hw["cpu"] = openvino.Core().get_property("CPU", "FULL_DEVICE_NAME")
    except Exception:  # noqa: BLE001 - the name is decoration
        pass
    print(f"\n{hw['cpu']}, {args.threads} threads, torch {hw['torch']}, OpenVINO {hw.get('openvino')}, "
          f"medians of {args.repeats} interleaved runs, random weights, paper widths\n")  # fmt: skip
    print("| network, window | PyTorch eager | OpenVINO fp32 | speed-up | conversion (once, cached) | labels agree | "
          "OpenVINO int8 | int8 over fp32 | quantisation (once, cached) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        w = " x ".join(str(v) for v in r["window"])
        int8 = (f"{r['int8_s']:.2f} s | {r['int8_speedup_over_openvino']:.2f}x | {r['int8_convert_s']:.1f} s" if "int8_s" in r
                else "- | - | -")  # fmt: skip
        print(f"| {r['network']}, {w} | {r['torch_s']:.2f} s | {r['openvino_s']:.2f} s | {r['speedup']:.2f}x | "
              f"{r['convert_s']:.1f} s | {100 * r['label_agreement']:.3f} % | {int8} |")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps({"hardware": hw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
