"""OpenVINO fp32 against PyTorch eager, one window of each network at the paper's widths (issue 23, item 1).

    python bench/bench_engine.py [--repeats 3] [--threads 2] [--networks organ,tumor,roi] [--out bench/results]

Random weights (the speed of a convolution does not depend on its values), the bundles' windows:
organ 224 x 128 x 64 and tumor 192 x 128 x 32 (``flare23.constants``, widths 32-320), and the ROI
extractor's 128 x 128 x 80 tile (widths ``ROI_FILTERS``). Per network: the OpenVINO conversion once
(its time reported, then cached as the pipeline caches it), a warm-up call of each engine, then
``--repeats`` rounds in which torch and OpenVINO alternate (interleaved, so that a change of machine
load hits both); the median seconds per window of each and their ratio. Agreement: the share of
voxels whose arg-max label is the same, and the largest probability difference.
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
from flare23.inference.engine import OpenVinoNetwork
from flare23.models.networks import ROI_FILTERS, LightUNet, NnDynUNet


def network(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "roi":
        return LightUNet(filters=ROI_FILTERS).eval(), tuple(ROI_PATCH_XYZ)
    strides, window = (ORGAN_STRIDES_XYZ, ORGAN_PATCH_XYZ) if name == "organ" else (TUMOR_STRIDES_XYZ, TUMOR_PATCH_XYZ)
    net = NnDynUNet(spatial_dims=3, in_channels=1, out_channels=15, kernel_size=KERNELS_XYZ, strides=strides,
                    upsample_kernel_size=strides[1:], filters=list(FILTERS), norm_name="instance", deep_supervision=False)  # fmt: skip
    return net.eval(), tuple(window)


def timed(fn, x) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn(x)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--networks", default="organ,tumor,roi")
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
            with torch.inference_mode():
                eager = net
                _, ref = timed(eager, x)  # warm-up
                _, got = timed(engine, x)
                t_torch, t_ov = [], []
                for _ in range(args.repeats):
                    t_torch.append(timed(eager, x)[0])
                    t_ov.append(timed(engine, x)[0])
        p_ref, p_got = torch.softmax(ref.float(), 1), torch.softmax(got, 1)
        row = {
            "network": name, "window": list(window), "torch_s": statistics.median(t_torch), "openvino_s": statistics.median(t_ov),
            "convert_s": convert, "label_agreement": (ref.argmax(1) == got.argmax(1)).float().mean().item(),
            "max_prob_diff": (p_ref - p_got).abs().max().item(), "torch_runs": t_torch, "openvino_runs": t_ov,
        }  # fmt: skip
        row["speedup"] = row["torch_s"] / row["openvino_s"]
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
    print("| network, window | PyTorch eager | OpenVINO fp32 | speed-up | conversion (once, cached) | labels agree |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        w = " x ".join(str(v) for v in r["window"])
        print(f"| {r['network']}, {w} | {r['torch_s']:.2f} s | {r['openvino_s']:.2f} s | {r['speedup']:.2f}x | "
              f"{r['convert_s']:.1f} s | {100 * r['label_agreement']:.3f} % |")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps({"hardware": hw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
