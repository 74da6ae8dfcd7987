"""Benchmark: our pipeline against nnU-Net v2 and the Model Zoo's way, on the same full-size inputs.

One command (CPU; the same script on a lent GPU with ``--device cuda``)::

    python bench/bench_compare.py [--sizes 100,300,500] [--real] [--repeats 3] [--filters 4,8,16,16,16,16]
                                  [--device cpu|cuda] [--threads 2] [--roi auto|model|oracle]
                                  [--systems ours,ours_openvino,ours_int8,nnunet,nnunet_default,monai]
                                  [--repeats_nnunet_default 1] [--out bench/results]

Inputs: full-size phantoms (``flare23.tools.phantoms.generate.make_phantom(size="full")``, 512 x 512 x SIZE) and,
with ``--real``, the real CT of ``../shared/data/real_ct/ts_example_ct``. Each run is one process
(clean peak-memory figures), with ``--threads`` threads (default 2); runs are interleaved (round r:
every input, every system), ``--repeats`` rounds (default 3); a system with fewer runs
(``--repeats_nnunet_default``, default 1: nnU-Net with mirroring takes over an hour a run at the
paper's widths on a CPU) runs in the first rounds only. Each table row says over how many runs its
median is.

* **ours** / **ours_openvino** / **ours_int8**: the pipeline bundle (``bench_pipeline.worker_ours``):
  ROI network -> crop -> tumor and organ branches -> blocked back-resampling with arg-max ->
  ensemble -> cc3d -> write, with the pipeline ids ``engine`` / ``precision``: ``torch`` and
  ``--precision`` (default ``auto``), ``openvino`` and ``--precision`` (``auto``: the pipeline's default on a
  CPU, bf16 where the CPU has native bf16 kernels, else fp32), ``openvino`` and ``int8`` with
  ``int8_calibration`` = a folder that ``flare23 calibrate`` makes, before the timed runs, from a
  held-out phantom (another seed) with the same weights and widths. The OpenVINO conversion
  (and int8 quantisation) is cached in one folder (``WORK/openvino_cache``, the pipeline's
  ``engine_cache``) by one untimed run before the timed ones, as a user's first run would; the
  timed runs read the cache (its read and compile time are in "other"; the warm-up's conversion
  time is in the JSON's ``meta.warmup``). The crop: ``--roi auto`` (default) = the box of the
  phantom's own labels (``oracle``) unless the ROI extractor has trained weights; with the oracle
  box the ROI network still runs and is timed, only its box is replaced (``bench_pipeline.resolve_roi``).
* **nnunet**: nnU-Net v2 2.8.1 in its own environment (``bench/.venv-nnunet``, made by
  ``bench/nnunet_env.sh``) predicting with a network of our organ model's size, on the whole
  uncropped volume, through its own reader, preprocessing, sliding window (step 0.8 = ours,
  Gaussian, mirroring off) and export (``bench/_nnunet_side.py``). One model, as the issue asks
  (ours runs ROI + two models).
* **nnunet_default**: the same model as nnU-Net's users run it: its defaults (step 0.5, Gaussian,
  test-time mirroring over all three axes, i.e. 8 network passes per window), its own
  preprocessing and export (``_nnunet_side.py predict --settings default``).
* **monai**: the Model Zoo's way (``bench_pipeline.worker_monai``): ``LoadImaged`` ->
  ``Orientationd`` -> ``Spacingd`` -> sliding window on the whole volume -> ``Invertd`` ->
  arg-max -> ``KeepLargestConnectedComponent`` -> ``SaveImage``, with our organ and tumor networks
  and weights.

Weights: ours (every engine) and monai share the same random state dicts (``bench_pipeline._random_ckpts``); nnU-Net's
network is a different class (``ResidualEncoderUNet``: a stem conv, one residual block per encoder
stage, two convs per decoder stage) with our widths, kernels and strides, so its weights are its
own random ones; the parameter counts of both are printed (equal within 1 %).

Then the probability-to-label stage alone: the same smooth random 15-channel float16 logits (the
dtype nnU-Net's predictor hands its export) on the
preprocessed grid of each 512 x 512 x SIZE input, given to nnU-Net's
``convert_predicted_logits_to_segmentation_with_correct_shape`` and to ours
(:func:`flare23.data.resample.resample_labels`, as the pipeline calls it), each in its own process,
interleaved (ours on the device with ``--device cuda``; nnU-Net's export runs on the CPU); the two
label maps are compared voxel by voxel.

Reported per system and input: median seconds end to end and per stage (read, preprocess, network,
back to the original grid, post-processing, write, other = set-up and whatever no stage covers),
peak resident memory (``ru_maxrss``), the memory-time area of the sampled memory (RSS on the CPU,
the whole device's used memory with ``--device cuda``, plus ``torch.cuda.max_memory_allocated``),
and the ratios (each of our engines against each other system). The first table says per row the
system's settings (engine and precision, or nnU-Net's step and mirroring), the widths, the ROI
source and the share of the volume it kept, the threads and the number of runs of the median. With
``--noise_repeats 0`` (or ``--export_repeats 0``) the rows of those logits are absent. Writes
``OUT/compare_<device>.json`` and ``OUT/compare_<device>.md`` (the Markdown
that the README's "Performance" section pastes) and prints the same Markdown.

``--device cuda`` defaults to the paper's widths, sizes 100 and 300 and a time budget of 450 s
(``--budget_s``): a round that would end past the budget is not started, so the whole run fits a
lent machine's 8 minutes; the number of runs actually done is in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

NNUNET_PYTHON = BENCH / ".venv-nnunet" / "bin" / "python"
SYSTEMS = ("ours", "ours_openvino", "ours_int8", "nnunet", "nnunet_default", "monai")
#: our pipeline, per system: the pipeline ids ``engine`` and ``precision`` (``None``: ``--precision``)
OURS = {"ours": ("torch", None), "ours_openvino": ("openvino", None), "ours_int8": ("openvino", "int8")}
#: nnU-Net, per system: ``_nnunet_side.py predict --settings``
NNUNET = {"nnunet": "equal", "nnunet_default": "default"}
OTHERS = ("nnunet", "nnunet_default", "monai")
LABELS = {
    "ours": "ours (ROI + organ + tumor)",
    "ours_openvino": "ours, OpenVINO (the CPU default)",
    "ours_int8": "ours, OpenVINO int8",
    "nnunet": "nnU-Net v2 at our settings (1 model)",
    "nnunet_default": "nnU-Net v2 as its users run it (1 model)",
    "monai": "MONAI Model Zoo way (2 models)",
}
#: the settings column where a run does not say more (ours' runs report their engine and precision)
SETTINGS = {
    "nnunet": "PyTorch, step 0.8 (= ours), Gaussian, no mirroring",
    "nnunet_default": "PyTorch, nnU-Net defaults: step 0.5, Gaussian, mirroring z, y, x",
    "monai": "PyTorch eager, fp32, step = ours, no mirroring",
}
ROI_TEXT = {"oracle": "oracle box (phantom labels)", "model": "ROI model"}
#: Common stage columns; every system's own stages are mapped onto them (:func:`stage_breakdown`).
STAGES = ("read", "preprocess", "network", "to_original_grid", "postprocess", "write", "other")
GOAL_SPEEDUP_NNUNET = 3.0
GOAL_SPEEDUP_NNUNET_DEFAULT = 10.0
GOAL_PEAK_RSS_MB_500 = 6 * 1024.0
GOAL_PEAK_RSS_MB_100 = 3 * 1024.0
GOAL_EXPORT_SPEEDUP = 20.0
EXPORT_KINDS = {"organ": "organ-like logits", "noise": "smooth-noise logits"}


# --- pure helpers (tested in tests/test_bench_compare.py) -------------------------------------------
def preprocessed_shape(shape, spacing, target) -> tuple[int, ...]:
    """Grid after resampling ``shape`` at ``spacing`` to ``target`` spacing: nnU-Net's ``round(shape * spacing / target)``."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def smooth_logits(n_classes: int, shape, seed: int = 0, coarse: int = 8):
    """Smooth random logits ``(C, *shape)`` float32: seeded coarse noise upsampled trilinearly (torch).

    Smooth like a network's output (class regions tens of voxels wide), deterministic for a seed.
    """
    import torch.nn.functional as F

    noise = _coarse_noise(n_classes, shape, seed, coarse)
    return F.interpolate(noise, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)[0].contiguous()


def _coarse_noise(n_classes: int, shape, seed: int, coarse: int = 8):
    """The seeded coarse noise ``(1, C, *ceil(shape / coarse))`` that :func:`smooth_logits` upsamples."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    small = [max(2, -(-int(s) // coarse)) for s in shape]
    return torch.from_numpy(rng.standard_normal((1, n_classes, *small)).astype(np.float32) * 4.0)


def organ_logits(label_xyz, grid_zyx, n_classes: int, seed: int = 0, scale: float = 8.0, noise: float = 0.25):
    """Organ-like logits ``(C, *grid_zyx)`` float16 from a full-resolution label map ``label_xyz`` (x, y, z).

    What a trained network hands the export: per class, the one-hot map taken trilinearly to the
    model grid (soft one-voxel boundaries), times ``scale``, plus ``noise`` times the seeded smooth
    noise of :func:`smooth_logits` (so that ties are broken and a few cells away from the organ
    surfaces are mixed as well). Built class by class in float16 to bound memory.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    grid_xyz = tuple(reversed([int(v) for v in grid_zyx]))
    lab = torch.from_numpy(np.ascontiguousarray(label_xyz))
    size = tuple(int(v) for v in grid_zyx)
    coarse = _coarse_noise(n_classes, grid_zyx, seed)  # smooth_logits' noise, upsampled one class at a time
    out = torch.empty((n_classes, *size), dtype=torch.float16)
    for c in range(n_classes):
        p = F.interpolate((lab == c).float()[None, None], size=grid_xyz, mode="trilinear", align_corners=False)[0, 0]
        smooth = F.interpolate(coarse[:, c : c + 1], size=size, mode="trilinear", align_corners=False)[0, 0]
        out[c] = (p.permute(2, 1, 0) * scale + noise * smooth).half()
    return out


def base_system(system: str) -> str:
    """``ours``, ``nnunet`` or ``monai``: the pipeline that a system of :data:`SYSTEMS` runs (its stage names)."""
    if system in OURS:
        return "ours"
    if system in NNUNET:
        return "nnunet"
    if system == "monai":
        return system
    raise ValueError(f"unknown system {system!r}")


def parse_systems(text: str) -> list[str]:
    """``--systems``: names of :data:`SYSTEMS`, comma-separated, in the order given (duplicates dropped)."""
    systems = list(dict.fromkeys(s.strip() for s in str(text).split(",") if s.strip()))
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        from flare23.errors import Flare23Error

        raise Flare23Error(f"--systems: unknown {', '.join(bad) or '(none given)'} (choose from {', '.join(SYSTEMS)})")
    return systems


def system_repeats(systems, repeats: int, per_system: dict | None = None) -> dict[str, int]:
    """Runs per system: ``repeats`` each, except those in ``per_system`` (at most ``repeats``: no extra rounds)."""
    per_system = per_system or {}
    return {s: max(0, min(int(repeats), int(per_system.get(s, repeats)))) for s in systems}


def round_systems(systems, r: int, repeats: dict[str, int]) -> list[str]:
    """The systems that run in round ``r`` (0-based): those with more than ``r`` runs, in ``systems``' order."""
    return [s for s in systems if repeats.get(s, 0) > r]


#: pipeline ids that ``flare23 calibrate`` refuses (it prepares fp32 inputs and writes no segmentation)
NOT_FOR_CALIBRATE = ("engine", "precision", "int8_calibration")


def calibration_overrides(ckpt_dir, filters, device: str = "cpu", cache=None) -> dict:
    """The pipeline ids for ``flare23 calibrate``: those of the timed ``ours_int8`` runs (same weights, widths, device,
    engine cache), less the ones that calibrate refuses (:data:`NOT_FOR_CALIBRATE`)."""
    from bench_pipeline import pipeline_overrides

    timed = pipeline_overrides(ckpt_dir, filters, device, "openvino", "int8", "(the calibration folder)", cache)
    return {k: v for k, v in timed.items() if k not in NOT_FOR_CALIBRATE}


def stage_breakdown(system: str, stages: dict) -> dict:
    """Map one run's own stage times onto :data:`STAGES` (+ ``end_to_end``); ``other`` is the remainder.

    * ours (``timings.csv`` of the cascade + read/write timed around ``ReadCased``/``SaveLabeld``):
      network = roi + both branches' network and aggregate (the window sums, which the others' network times
      include); preprocess = crop + both branches'
      preprocessing; to_original_grid = both ``*_resample`` + paste; postprocess = ensemble +
      postprocess.
    * monai: read = ``LoadImaged`` (twice: once per branch); preprocess = the rest of both
      preprocessing chains; to_original_grid = both ``Invertd`` + arg-max; postprocess = ensemble +
      ``KeepLargestConnectedComponent``.
    * nnunet: read, preprocess, network, to_original_grid, write as timed in ``_nnunet_side.predict``.

    ``system`` is any of :data:`SYSTEMS` (each engine of ours has ours' stages; both nnU-Net modes
    nnU-Net's). Set-up is in ``other``: loading the networks, nnU-Net's predictor, and for
    OpenVINO reading and compiling the cached model (``*_convert``).
    """
    g = lambda *keys: sum(float(stages.get(k, 0.0)) for k in keys)  # noqa: E731
    system = base_system(system)
    if system == "ours":
        out = {
            "read": g("read"),
            "preprocess": g("crop", "tumor_preprocess", "organ_preprocess"),
            # MONAI's and nnU-Net's network times include the sums of the windows: so does ours here
            "network": g("roi", "tumor_network", "organ_network", "tumor_aggregate", "organ_aggregate"),
            "to_original_grid": g("tumor_resample", "organ_resample", "paste"),
            "postprocess": g("ensemble", "postprocess"),
            "write": g("write"),
        }
    elif system == "monai":
        out = {
            "read": g("read"),
            "preprocess": g("tumor_preprocess", "organ_preprocess") - g("read"),
            "network": g("tumor_network", "organ_network"),
            "to_original_grid": g("tumor_invert_argmax", "organ_invert_argmax"),
            "postprocess": g("ensemble_postprocess"),
            "write": g("write"),
        }
    else:
        out = {k: g(k) for k in ("read", "preprocess", "network", "to_original_grid")}
        out.update(postprocess=0.0, write=g("write"))
    end = float(stages["end_to_end_s"])
    out["other"] = max(0.0, end - sum(out.values()))
    out["end_to_end"] = end
    return out


def summarize(runs: list[dict]) -> dict:
    """Medians over runs of every stage column, peak RSS and the memory fields present in all runs."""
    keys = [k for k in (*STAGES, "end_to_end") if all(k in r["breakdown"] for r in runs)]
    med = {k: statistics.median(r["breakdown"][k] for r in runs) for k in keys}
    for k in ("peak_rss_mb", "auc_mb_s", "peak_sampled_mb", "peak_torch_mb"):
        vals = [r.get(k) for r in runs]
        if vals and all(v is not None for v in vals):
            med[k] = statistics.median(vals)
    crops = [r.get("crop_fraction") for r in runs]
    if crops and all(v is not None for v in crops):
        med["crop_fraction"] = statistics.median(crops)
    for k in ("settings", "engine", "precision", "roi", "roi_weights"):  # the same in every run of a system
        if runs and runs[0].get(k) is not None:
            med[k] = runs[0][k]
    med["runs"] = len(runs)
    med["end_to_end_runs"] = [round(r["breakdown"]["end_to_end"], 2) for r in runs]
    return med


def row_settings(system: str, m: dict) -> str:
    """The settings column of a row: ours' engine and precision as its runs report them, else :data:`SETTINGS`."""
    if system in OURS:
        engine, precision = m.get("engine") or OURS[system][0], m.get("precision") or OURS[system][1] or "auto"
        text = f"{'OpenVINO' if engine == 'openvino' else 'PyTorch eager'} {precision}"
        return text + (", calibrated on a held-out phantom" if precision == "int8" else "")
    return m.get("settings") or SETTINGS.get(system, "")


def row_roi(system: str, m: dict) -> str:
    """The ROI column of a row: where ours' crop came from and the share of the volume it kept; none for the others."""
    if system not in OURS:
        return "none (whole volume" + ("; nnU-Net crops to non-zero)" if system in NNUNET else ")")
    roi = m.get("roi")
    text = ROI_TEXT.get(roi, str(roi or "?"))
    if roi == "model":
        text += f" ({m.get('roi_weights', '?')} weights)"
    if m.get("crop_fraction") is not None:
        text += f", {100 * m['crop_fraction']:.0f} % of the volume"
    return text


def _f(v, nd=1) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def _x(v) -> str:
    return "not run" if v is None else f"{v:.2f}x"


def markdown(result: dict) -> str:
    """The Markdown tables of a result dict (what the README's "Performance" section pastes)."""
    meta, summary = result["meta"], result["summary"]
    cuda = meta["device"] == "cuda"
    params = meta["params"]
    nn_params = f"{params['nnunet']:,}" if params.get("nnunet") else "not built"
    widths = ",".join(map(str, meta["filters"]))
    threads = meta.get("threads")
    lines = [
        f"Hardware: {meta['hardware']}. Device: {meta['device']}. Widths {widths} for all systems "
        f"(organ network: ours {params['ours_organ']:,} parameters, nnU-Net {nn_params} "
        f"[{params.get('nnunet_network') or '-'}]), random weights. Median of the runs shown (interleaved, one process "
        "each; runs = how many runs the median is over).",
        "",
        "| input | system | settings | widths | ROI | threads | runs | end to end s | read | preprocess | network"
        f" | to original grid | post | write | other | peak RSS MB |{' peak device MB | device MB s |' if cuda else ''}",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cuda else ""),
    ]
    for case, systems in summary.items():
        for system, m in systems.items():
            row = [case, LABELS.get(system, system), row_settings(system, m), widths, row_roi(system, m), str(threads or ""),
                   str(m["runs"]), _f(m["end_to_end"])]  # fmt: skip
            row += [_f(m.get(s)) for s in STAGES]
            row.append(_f(m.get("peak_rss_mb"), 0))
            if cuda:
                row += [_f(m.get("peak_sampled_mb"), 0), _f(m.get("auc_mb_s"), 0)]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| input | ours | nnU-Net at our settings / ours (time) | nnU-Net as its users run it / ours (time) | "
              "MONAI / ours (time) | ours / nnU-Net at our settings (peak RSS) | ours / nnU-Net as users run it (peak RSS) | "
              "ours / MONAI (peak RSS) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for case, per in result["ratios"].items():
        for mine, r in per.items():
            cells = [_x(r.get(f"speedup_vs_{o}")) for o in OTHERS] + [_f(r.get(f"rss_vs_{o}"), 2) for o in OTHERS]
            lines.append(f"| {case} | {LABELS.get(mine, mine)} | " + " | ".join(cells) + " |")
    if result.get("export"):
        lines += ["", "Probability-to-label stage alone (same 15-channel float16 logits on the preprocessed grid, "
                  "back to the 512 x 512 x N grid, arg-max; organ-like logits = the phantom's labels as a trained model "
                  "gives them, smooth noise = class regions a few voxels wide everywhere, our worst case):", "",
                  "| input | logits grid (z, y, x) | runs | nnU-Net export s | ours s | speed-up | peak RSS nnU-Net / ours MB | labels equal |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for case, e in result["export"].items():
            lines.append(
                f"| {case} | {' x '.join(map(str, e['grid_zyx']))} | {e['runs']} | {_f(e['nnunet_s'], 2)} | {_f(e['ours_s'], 2)} | "
                f"{_f(e['speedup'], 1)}x | {_f(e['nnunet_rss_mb'], 0)} / {_f(e['ours_rss_mb'], 0)} | {_f(100 * e['agreement'], 2)} % |"
            )
    if result.get("goals"):
        lines += ["", "Goals:"] + [f"- {g}" for g in result["goals"]]
    lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def ratios(summary: dict) -> dict:
    """Per input and per engine of ours: the others' end-to-end time over ours (``speedup_vs_*``), our peak RSS over theirs."""
    out = {}
    for case, s in summary.items():
        per = {}
        for mine in OURS:
            if mine not in s:
                continue
            r = {}
            for other in OTHERS:
                if other in s:
                    r[f"speedup_vs_{other}"] = s[other]["end_to_end"] / s[mine]["end_to_end"]
                    if s[mine].get("peak_rss_mb") and s[other].get("peak_rss_mb"):
                        r[f"rss_vs_{other}"] = s[mine]["peak_rss_mb"] / s[other]["peak_rss_mb"]
            per[mine] = r
        out[case] = per
    return out


def goals(result: dict) -> list[str]:
    """The issues' goals (CPU machine), each stated as met or missed with the figures, for each engine of ours."""
    if result["meta"]["device"] != "cpu":
        return []
    from flare23.constants import FILTERS

    lines = []
    filters = [int(f) for f in result["meta"].get("filters") or ()]
    if filters != list(FILTERS):
        lines.append(f"widths {','.join(map(str, filters))} are not the paper's ({','.join(map(str, FILTERS))}): "
                     "the end-to-end goals are set at the paper's widths")  # fmt: skip
    for case, per in result["ratios"].items():
        for mine, r in per.items():
            for other, goal in (("nnunet", GOAL_SPEEDUP_NNUNET), ("nnunet_default", GOAL_SPEEDUP_NNUNET_DEFAULT)):
                if f"speedup_vs_{other}" in r:
                    v = r[f"speedup_vs_{other}"]
                    lines.append(f"{case}: end to end, {LABELS[other]} time / {LABELS[mine]} = {v:.2f}x (goal >= {goal:g}x): "
                                 f"{'met' if v >= goal else 'MISSED'}")  # fmt: skip
    for case, s in result["summary"].items():
        goal = GOAL_PEAK_RSS_MB_500 if case.endswith("x 500") else GOAL_PEAK_RSS_MB_100 if case.endswith("x 100") else None
        for mine in OURS:
            if goal is None or mine not in s or s[mine].get("peak_rss_mb") is None:
                continue
            rss = s[mine]["peak_rss_mb"]
            lines.append(f"{case}: peak RSS of {LABELS[mine]} {rss / 1024:.2f} GB (goal <= {goal / 1024:g} GB): "
                         f"{'met' if rss <= goal else 'MISSED'}")  # fmt: skip
    for case, e in (result.get("export") or {}).items():
        if e.get("logits", "organ") != "organ":
            lines.append(
                f"{case} (worst case, not the goal's input): probability-to-label {e['speedup']:.1f}x faster than nnU-Net's export"
            )
            continue
        ok = e["speedup"] >= GOAL_EXPORT_SPEEDUP
        lines.append(f"{case}: probability-to-label {e['speedup']:.1f}x faster than nnU-Net's export (goal >= {GOAL_EXPORT_SPEEDUP:g}x): "
                     f"{'met' if ok else 'MISSED'}")  # fmt: skip
    return lines


def export_stage(cases: dict, kinds, repeats: dict, run_side, make_inputs, over_budget=None) -> dict:
    """The probability-to-label stage on every input of ``cases`` and every logits kind: the rows of the export table.

    ``repeats[kind]`` runs per kind (interleaved: nnU-Net's export, then ours, per run); a kind with
    0 runs has no row and nothing is made for it. ``make_inputs(case_dir, export_dir, kind)`` writes
    the logits and returns ``{"grid_zyx": ...}`` (:func:`_export_inputs`); ``run_side(side, export_dir,
    case)`` runs one side (``nnunet`` or ``ours``), which writes ``labels_<side>.npy`` there and returns
    ``{"seconds", "peak_rss_mb"}``; ``over_budget()`` true skips what is left.
    """
    import numpy as np

    export: dict[str, dict] = {}
    for case, d in cases.items():
        for kind in kinds:
            n = int(repeats.get(kind, 0))
            if n <= 0:
                continue
            if over_budget is not None and over_budget():
                print(f"time budget: probability-to-label stage skipped for {case} ({kind})", flush=True)
                continue
            ed = Path(d) / f"export_{kind}"
            info = make_inputs(Path(d), ed, kind)
            res: dict[str, list] = {"nnunet": [], "ours": []}
            for _ in range(n):
                for side in res:
                    res[side].append(run_side(side, ed, case))
            agreement = float((np.load(ed / "labels_nnunet.npy") == np.load(ed / "labels_ours.npy")).mean())
            e = {k: statistics.median(x["seconds"] for x in v) for k, v in res.items()}
            export[f"{case}, {EXPORT_KINDS[kind]}"] = {
                **info,
                "case": case,
                "logits": kind,
                "runs": n,
                "nnunet_s": e["nnunet"],
                "ours_s": e["ours"],
                "speedup": e["nnunet"] / e["ours"],
                "nnunet_rss_mb": statistics.median(x["peak_rss_mb"] for x in res["nnunet"]),
                "ours_rss_mb": statistics.median(x["peak_rss_mb"] for x in res["ours"]),
                "agreement": agreement,
            }
            (ed / "logits.npy").unlink(missing_ok=True)
            print(
                f"{case} ({kind} logits): probability-to-label nnU-Net {e['nnunet']:.2f} s, ours {e['ours']:.2f} s, "
                f"labels equal {100 * agreement:.2f} %",
                flush=True,
            )
    return export


def measured(fn, device: str = "cpu", interval: float = 0.1) -> tuple[object, dict]:
    """Run ``fn()`` under :class:`flare23.efficiency.EfficiencyMonitor`; returns its result and the memory fields."""
    from flare23.efficiency import EfficiencyMonitor

    monitor = EfficiencyMonitor(device=device, interval=interval)
    with monitor:
        result = fn()
    return result, {"auc_mb_s": monitor.auc_mb_s, "peak_sampled_mb": monitor.peak_mb, "peak_torch_mb": monitor.peak_torch_mb}


# --- workers (one process each) ----------------------------------------------------------------------
def _timed_method(cls, name: str, times: dict, key: str) -> None:
    """Accumulate the wall time of ``cls.name`` calls into ``times[key]`` (this process only)."""
    original = getattr(cls, name)

    def wrapper(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - t0

    setattr(cls, name, wrapper)


def worker_project(args) -> dict:
    """ours (any engine) or monai, via ``bench_pipeline``'s workers, with read / write timed and memory sampled."""
    import bench_pipeline

    extra: dict[str, float] = {}
    if args.system in OURS:
        from flare23.inference.cases import ReadCased, SaveLabeld

        engine, precision = OURS[args.system]
        args.engine, args.precision = engine, precision or args.precision
        _timed_method(ReadCased, "__call__", extra, "read")
        _timed_method(SaveLabeld, "__call__", extra, "write")
        # worker_ours records the box (the ROI network's or the oracle's) and the share of the volume it keeps
        result, memory = measured(lambda: bench_pipeline.worker_ours(args), args.device)
        result["stages"].update(extra)
    else:
        from monai.transforms import LoadImaged

        _timed_method(LoadImaged, "__call__", extra, "read")
        result, memory = measured(lambda: bench_pipeline.worker_monai(args), args.device)
        result["stages"].update(extra)
    result.update(memory)
    return result


def worker_export_ours(args) -> dict:
    """Ours on the shared logits: :func:`flare23.data.resample.resample_labels` as the pipeline calls it."""
    import numpy as np
    import torch

    from flare23.data.resample import DEFAULT_BLOCK, resample_labels

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    geometry = json.loads((work / "geometry.json").read_text())
    # the pipeline's arrays are RAS (x, y, z): the same logits in that order, contiguous as the pipeline has them
    logits = torch.from_numpy(np.load(work / "logits.npy")).permute(0, 3, 2, 1).contiguous()
    out_xyz = tuple(reversed([int(v) for v in geometry["shape_zyx"]]))
    device = torch.device(getattr(args, "device", "cpu"))
    cuda = device.type == "cuda"
    if cuda:  # the pipeline's probabilities are already on the device: the copy is not timed
        logits = logits.to(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    labels = resample_labels(logits, out_xyz, block=DEFAULT_BLOCK, axis=2, out_device="cpu")
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    np.save(work / "labels_ours.npy", labels.numpy().transpose(2, 1, 0))
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- driver ----------------------------------------------------------------------------------------
def _run(cmd: list[str], what: str, env: dict | None = None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        from flare23.errors import Flare23Error

        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(proc.stderr[-4000:], file=sys.stderr)
        raise Flare23Error(f"{what} failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(line[-1][7:])


def _nnunet_env(threads: int) -> dict:
    return {"nnUNet_def_n_proc": str(threads), "nnUNet_raw": "", "nnUNet_preprocessed": "", "nnUNet_results": ""}


def _prepare_inputs(work: Path, args) -> dict[str, Path]:
    """One folder per input with ``in/<name>_0000.nii.gz``, ``oracle_box.json`` and the shared checkpoints."""
    import nibabel as nib
    from bench_pipeline import _random_ckpts, prepare

    from flare23.io import load_nifti
    from flare23.roi.box import roi_box

    cases: dict[str, Path] = {}
    for n in args.sizes:
        d = work / f"phantom_{n}"
        if not (d / "in").is_dir():
            print(f"preparing a 512 x 512 x {n} phantom ...", flush=True)
            prepare(d, n, args.seed, args.filters)  # also writes organ.pt / tumor.pt / roi.pt (same seed: identical)
        cases[f"512 x 512 x {n}"] = d
    if args.real:
        src = Path(args.real_ct)
        d = work / "real_ct"
        (d / "in").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "ct.nii.gz", d / "in" / "real_0000.nii.gz")
        label, affine, _ = load_nifti(src / "label_flare.nii.gz")
        organs = (label > 0) & (label < 14)
        box = roi_box(organs, (1, 1, 1), organs.shape, affine)
        (d / "oracle_box.json").write_text(json.dumps({"start": box.start, "stop": box.stop, "shape": list(organs.shape)}))
        _random_ckpts(d, args.filters)
        first = next(iter(cases.values()), None)
        if first is not None:
            shutil.copyfile(first / "roi.pt", d / "roi.pt")
        else:
            import torch
            from bench_pipeline import BUNDLES

            from flare23.bundles import SubBundle

            torch.save(SubBundle(BUNDLES / "roi_extractor", "inference.json").network().state_dict(), str(d / "roi.pt"))
        shape = nib.load(str(d / "in" / "real_0000.nii.gz")).shape
        cases[f"real CT {' x '.join(map(str, shape))}"] = d
    return cases


def _hardware(threads: int) -> str:
    from bench_pipeline import _hardware as hw

    text = hw(threads)  # every worker here runs with --threads
    load = ""
    try:
        load = f", load average {os.getloadavg()[0]:.1f} at the start"
    except OSError:
        pass
    return text + load


def _export_inputs(case_dir: Path, out: Path, seed: int, kind: str = "organ") -> dict:
    """Logits on the organ model's preprocessed grid of the case in ``case_dir`` (nnU-Net's z, y, x order).

    ``kind``: ``organ`` (:func:`organ_logits` of the phantom's labels: what a trained model gives) or
    ``noise`` (:func:`smooth_logits`: class regions a few voxels wide everywhere, the worst case for
    our mixed-cell interpolation; nnU-Net's export costs the same whatever the values).
    """
    import nibabel as nib
    import numpy as np

    from flare23.constants import NUM_CLASSES, ORGAN_SPACING_ZYX

    img = nib.load(str(next((case_dir / "in").iterdir())))
    spacing_xyz = [float(v) for v in img.header.get_zooms()[:3]]
    shape_zyx = list(reversed(img.shape[:3]))
    spacing_zyx = list(reversed(spacing_xyz))
    grid = preprocessed_shape(shape_zyx, spacing_zyx, ORGAN_SPACING_ZYX)
    out.mkdir(parents=True, exist_ok=True)
    # float16: what nnU-Net's predictor hands its export (its logits accumulate in half precision)
    if kind == "organ":
        logits = organ_logits(np.load(case_dir / "label.npy"), grid, NUM_CLASSES, seed)
    else:
        logits = smooth_logits(NUM_CLASSES, grid, seed).half()
    np.save(out / "logits.npy", logits.numpy())
    del logits
    (out / "geometry.json").write_text(json.dumps({"shape_zyx": shape_zyx, "spacing_zyx": spacing_zyx}))
    return {"grid_zyx": list(grid)}


def nnunet_settings_text(settings: dict) -> str:
    """The settings column of an nnU-Net row, from what its predictor reported (``_nnunet_side.predict``)."""
    from _nnunet_side import NNUNET_DEFAULTS, tile_step_size

    step = float(settings["tile_step_size"])
    axes = [int(a) for a in settings.get("mirror_axes") or ()]
    note = (
        " (= ours)"
        if abs(step - tile_step_size()) < 1e-6
        else " (nnU-Net's default)"
        if step == NNUNET_DEFAULTS["tile_step_size"]
        else ""
    )
    mirror = f"mirroring {', '.join('zyx'[a] for a in axes)}" if settings.get("use_mirroring") and axes else "no mirroring"
    gauss = "Gaussian" if settings.get("use_gaussian", True) else "no Gaussian"
    return f"PyTorch, step {step:g}{note}, {gauss}, {mirror}"


def _calibration_phantom(folder: Path, slices: int, seed: int) -> Path:
    """A held-out 512 x 512 x ``slices`` phantom (another seed than the benchmark's) with its oracle box, for calibration."""
    import nibabel as nib

    from flare23.roi.box import roi_box
    from flare23.tools.phantoms.generate import make_phantom

    scans = folder / "in"
    if not (scans / "calibration_0000.nii.gz").is_file() or not (folder / "oracle_box.json").is_file():
        case = make_phantom(seed, size="full", slices=slices, orientation="RAS")
        scans.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(case["image"], case["affine"]), str(scans / "calibration_0000.nii.gz"))
        organs = (case["label"] > 0) & (case["label"] < 14)
        box = roi_box(organs, (1, 1, 1), organs.shape, case["affine"])
        (folder / "oracle_box.json").write_text(json.dumps({"start": box.start, "stop": box.stop, "shape": list(organs.shape)}))
    return folder


def worker_calibrate(args) -> dict:
    """``flare23 calibrate`` (its function, :func:`flare23.inference.calibrate.calibrate`) on the held-out phantom in
    ``--work``, with :func:`calibration_overrides` of the weights in ``--ckpt_dir``; with ``--roi oracle`` the crop
    is the phantom's oracle box (as in the timed runs: calibration must not depend on random ROI weights either)."""
    import flare23.roi.box as roi_module
    from flare23.inference.calibrate import DEFAULT_WINDOWS, calibrate
    from flare23.roi.box import RoiBox

    work = Path(args.work)
    if args.roi == "oracle":
        b = json.loads((work / "oracle_box.json").read_text())
        oracle = RoiBox(tuple(b["start"]), tuple(b["stop"]), tuple(b["shape"]))
        roi_module.locate = lambda *a, **k: oracle  # calibrate imports it from flare23.roi.box when called
    overrides = calibration_overrides(args.ckpt_dir, args.filters, args.device, args.engine_cache)
    t0 = time.perf_counter()
    calibrate(str(work / "in"), args.int8_calibration, windows=args.calibration_windows or DEFAULT_WINDOWS, threads=args.threads,
              **overrides)  # fmt: skip
    return {"seconds": time.perf_counter() - t0, "overrides": overrides, "windows": args.calibration_windows or DEFAULT_WINDOWS}


def _calibrate_available() -> bool:
    try:
        import flare23.inference.calibrate  # noqa: F401

        return True
    except ImportError:
        return False


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=None, help="phantom slice counts (default 100,300,500; cuda: 100,300)")
    p.add_argument("--real", action=argparse.BooleanOptionalAction, default=True, help="also the real CT of ../shared")
    p.add_argument("--real_ct", default=str(ROOT.parent / "shared" / "data" / "real_ct" / "ts_example_ct"))
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds: runs per system and input")
    p.add_argument(
        "--repeats_nnunet_default",
        type=int,
        default=1,
        help="runs of nnunet_default (at most --repeats; it runs in the first rounds): over an hour a run at the paper's widths",
    )
    p.add_argument("--filters", default=None, help="widths of the 6 stages (default cpu: 4,8,16,16,16,16; cuda: the paper's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", help="precision of the `ours` and `ours_openvino` systems")
    p.add_argument("--threads", type=int, default=2, help="threads per run, every system")
    p.add_argument("--roi", choices=("auto", "model", "oracle"), default="auto",
                   help="our crop: oracle = the box of the phantom's labels; model = the ROI network's; auto = model only with trained ROI weights")  # fmt: skip
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--systems", default=None, help=f"of {', '.join(SYSTEMS)} (default cpu: all; cuda: those without OpenVINO)")
    p.add_argument("--calibration_slices", type=int, default=None, help="held-out phantom for ours_int8 (default: smallest size)")
    p.add_argument("--calibration_windows", type=int, default=None, help="`flare23 calibrate --windows` (default: its own)")
    p.add_argument("--arch", choices=("resenc", "plain"), default="resenc", help="nnU-Net network class")
    p.add_argument(
        "--monai_max_slices",
        type=int,
        default=300,
        help="skip the Model Zoo way above this (its 15-channel Invertd needs ~16 GB at 500)",
    )
    p.add_argument("--export_sizes", default=None, help="sizes for the probability-to-label stage (default: --sizes)")
    p.add_argument(
        "--e2e_sizes", default=None, help="sizes run end to end (default: --sizes; the others only for the export stage)"
    )
    p.add_argument("--export_repeats", type=int, default=3, help="runs of the probability-to-label stage on organ-like logits")
    p.add_argument(
        "--export_logits", default="organ,noise", help="logits for that stage: organ (from the phantom's labels), noise"
    )
    p.add_argument("--noise_repeats", type=int, default=1, help="runs on the smooth-noise logits (worst case for ours; 0: none)")
    p.add_argument("--budget_s", type=float, default=None, help="stop starting rounds past this (default cpu: none; cuda: 450)")
    p.add_argument("--nnunet_python", default=str(NNUNET_PYTHON))
    p.add_argument("--work", default=None)
    p.add_argument("--out", default=str(BENCH / "results"))
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--system", default=None, help=argparse.SUPPRESS)
    p.add_argument("--engine_cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--int8_calibration", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt_dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.filters is None:
        from flare23.constants import FILTERS

        args.filters = ",".join(map(str, FILTERS)) if cuda else "4,8,16,16,16,16"
    args.filters = [int(v) for v in str(args.filters).split(",")]
    if args._worker:
        import torch

        torch.set_num_threads(args.threads)
        workers = {"project": worker_project, "export": worker_export_ours, "calibrate": worker_calibrate}
        result = workers[args._worker](args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    _drive(args, cuda)


def _drive(args, cuda: bool) -> None:
    from bench_pipeline import TRAINED_ROI, resolve_roi

    from flare23.errors import Flare23Error
    from flare23.io import atomic_write_json, atomic_write_text

    t_begin = time.perf_counter()
    args.sizes = [int(v) for v in str(args.sizes or ("100,300" if cuda else "100,300,500")).split(",") if v]
    export_sizes = [int(v) for v in str(args.export_sizes).split(",") if v] if args.export_sizes else list(args.sizes)
    e2e_sizes = [int(v) for v in str(args.e2e_sizes).split(",") if v] if args.e2e_sizes else list(args.sizes)
    budget = args.budget_s if args.budget_s is not None else (450.0 if cuda else 0.0)
    default_systems = [s for s in SYSTEMS if not (cuda and OURS.get(s, ("torch",))[0] == "openvino")]
    systems = parse_systems(args.systems or ",".join(default_systems))
    if cuda and any(OURS.get(s, ("torch",))[0] == "openvino" for s in systems):
        raise Flare23Error("--systems: ours_openvino and ours_int8 run on the CPU only (OpenVINO's CPU plugin)")
    repeats = system_repeats(systems, args.repeats, {"nnunet_default": args.repeats_nnunet_default})
    kinds = [k for k in str(args.export_logits).split(",") if k]
    bad = [k for k in kinds if k not in ("organ", "noise")]
    if bad:
        raise Flare23Error(f"--export_logits: unknown {', '.join(bad)} (choose from organ, noise)")
    export_repeats = {"organ": args.export_repeats, "noise": args.noise_repeats}
    exporting = bool(export_sizes) and any(export_repeats[k] > 0 for k in kinds)
    nn_py = Path(args.nnunet_python)
    if (any(s in NNUNET for s in systems) or exporting) and not nn_py.is_file():
        raise Flare23Error(f"{nn_py}: nnU-Net's environment not found; create it with `bash bench/nnunet_env.sh`")
    if "ours_int8" in systems and not _calibrate_available():
        raise Flare23Error("ours_int8 needs the `flare23 calibrate` command, which this checkout lacks: drop it from --systems")
    if args.real and not (Path(args.real_ct) / "ct.nii.gz").is_file():
        raise Flare23Error(f"{Path(args.real_ct) / 'ct.nii.gz'}: real CT not found (pass --no-real or --real_ct DIR)")
    work = Path(args.work or tempfile.mkdtemp(prefix="flare23-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    filters = ",".join(map(str, args.filters))
    nenv = _nnunet_env(args.threads)
    trained_roi = TRAINED_ROI.is_file()
    roi = resolve_roi(args.roi, trained_roi)
    print(f"systems {', '.join(f'{s} x{repeats[s]}' for s in systems)}; ROI {roi} ({'trained' if trained_roi else 'random'} ROI weights)",
          flush=True)  # fmt: skip

    # networks: parameter counts of both organ networks, nnU-Net's model folder
    import warnings

    warnings.filterwarnings("ignore")
    from bench_pipeline import BUNDLES

    from flare23.bundles import SubBundle

    ours_params = sum(
        p.numel()
        for p in SubBundle(BUNDLES / "organ_seg", "inference.json", {"network_def#filters": args.filters}).network().parameters()
    )
    model = work / "nnunet_model"
    params = {"ours_organ": ours_params, "nnunet": None, "nnunet_network": None}
    if nn_py.is_file():
        built = _run([str(nn_py), str(BENCH / "_nnunet_side.py"), "build", "--model", str(model), "--filters", filters, "--arch", args.arch],
                     "nnU-Net model build", nenv)  # fmt: skip
        params.update(nnunet=built["parameters"], nnunet_network=built["network"])
    print(f"organ network parameters: ours {ours_params:,}, nnU-Net {params['nnunet']} ({params['nnunet_network']})", flush=True)

    cases = _prepare_inputs(work, args)
    e2e_cases = {c: d for c, d in cases.items() if not c.startswith("512 x 512 x ") or int(c.split()[-1]) in e2e_sizes}
    engine_cache = work / "openvino_cache"

    # int8: calibration on a held-out phantom with the benchmark's weights, outside the timed runs
    calibration_dir, calibration = None, None
    if "ours_int8" in systems:
        first = next(iter(cases.values()))
        slices = args.calibration_slices or min(args.sizes)
        seed = args.seed + 1000
        held_out = _calibration_phantom(work / "calibration_phantom", slices, seed)
        calibration_dir = work / "int8_calibration"
        cmd = [sys.executable, __file__, "--_worker", "calibrate", "--work", str(held_out), "--ckpt_dir", str(first), "--filters", filters,
               "--device", args.device, "--threads", str(args.threads), "--roi", roi, "--engine_cache", str(engine_cache),
               "--int8_calibration", str(calibration_dir)]  # fmt: skip
        if args.calibration_windows:
            cmd += ["--calibration_windows", str(args.calibration_windows)]
        print(f"calibrating int8 on a held-out 512 x 512 x {slices} phantom (seed {seed}, ROI {roi}) ...", flush=True)
        res = _run(cmd, "int8 calibration")
        calibration = {"phantom": f"512 x 512 x {slices}, seed {seed}", "roi": roi, "folder": str(calibration_dir), **res}
        print(f"calibration and int8 quantisation: {res['seconds']:.1f} s ({res['windows']} windows per network)", flush=True)

    def ours_cmd(system: str, d: Path) -> list[str]:
        cmd = [sys.executable, __file__, "--_worker", "project", "--system", system, "--work", str(d), "--filters", filters,
               "--device", args.device, "--precision", args.precision, "--threads", str(args.threads), "--roi", roi]  # fmt: skip
        if system in OURS and OURS[system][0] == "openvino":
            cmd += ["--engine_cache", str(engine_cache)]
        if system == "ours_int8":
            cmd += ["--int8_calibration", str(calibration_dir)]
        return cmd

    # OpenVINO: one untimed run per engine fills the conversion cache (a user's first run), on the smallest input
    warmup: dict[str, dict] = {}
    if e2e_cases:
        smallest = min(e2e_cases, key=lambda c: sum(f.stat().st_size for f in (e2e_cases[c] / "in").iterdir()))
        for system in (s for s in systems if s in OURS and OURS[s][0] == "openvino"):
            res = _run(ours_cmd(system, e2e_cases[smallest]), f"{system} warm-up on {smallest}")
            convert = sum(float(v) for k, v in res["stages"].items() if k.endswith("_convert"))
            warmup[system] = {"case": smallest, "end_to_end_s": res["stages"]["end_to_end_s"], "convert_s": convert}
            print(f"warm-up {system} on {smallest} (untimed): {res['stages']['end_to_end_s']:.1f} s, conversion {convert:.1f} s",
                  flush=True)  # fmt: skip

    runs: dict[str, dict[str, list]] = {c: {s: [] for s in systems} for c in e2e_cases}
    round_times: list[float] = []
    for r in range(max(repeats.values(), default=0)):
        if budget and round_times and time.perf_counter() - t_begin + max(round_times) > budget:
            print(f"budget {budget:.0f} s: stopping after {r} round(s)", flush=True)
            break
        t_round = time.perf_counter()
        for case, d in e2e_cases.items():
            for system in round_systems(systems, r, repeats):
                if system == "monai" and case.startswith("512 x 512 x ") and int(case.split()[-1]) > args.monai_max_slices:
                    continue
                if system in NNUNET:
                    out = d / f"out_{system}"
                    out.mkdir(exist_ok=True)
                    cmd = [str(nn_py), str(BENCH / "_nnunet_side.py"), "predict", "--model", str(model), "--image",
                           str(next((d / "in").iterdir())), "--out", str(out / "seg.nii.gz"), "--device", args.device,
                           "--threads", str(args.threads), "--settings", NNUNET[system]]  # fmt: skip
                    res = _run(cmd, f"{system} on {case}", nenv)
                    res["nnunet_settings"] = res.pop("settings")
                    res["settings"] = nnunet_settings_text(res["nnunet_settings"])
                else:
                    res = _run(ours_cmd(system, d), f"{system} on {case}")
                res["breakdown"] = stage_breakdown(system, res["stages"])
                runs[case][system].append(res)
                print(
                    f"round {r + 1} {case} {system}: {res['breakdown']['end_to_end']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
        round_times.append(time.perf_counter() - t_round)

    summary = {c: {s: summarize(v) for s, v in sv.items() if v} for c, sv in runs.items() if any(sv.values())}
    crop = {c: next((sv[s][0].get("crop_fraction") for s in OURS if sv.get(s)), None) for c, sv in runs.items()}

    export_cases = {c: d for c, d in cases.items() if any(c == f"512 x 512 x {n}" for n in export_sizes)}

    def run_side(side: str, ed: Path, case: str) -> dict:
        if side == "nnunet":
            cmd = [
                str(nn_py),
                str(BENCH / "_nnunet_side.py"),
                "export",
                "--model",
                str(model),
                "--work",
                str(ed),
                "--threads",
                str(args.threads),
            ]
            return _run(cmd, f"nnU-Net export on {case}", nenv)
        cmd = [
            sys.executable,
            __file__,
            "--_worker",
            "export",
            "--work",
            str(ed),
            "--threads",
            str(args.threads),
            "--device",
            args.device,
        ]
        return _run(cmd, f"our export on {case}")

    export = export_stage(export_cases, kinds, export_repeats, run_side,
                          lambda d, ed, kind: _export_inputs(d, ed, args.seed, kind),
                          (lambda: time.perf_counter() - t_begin > budget) if budget else None)  # fmt: skip

    command = "python bench/bench_compare.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else "python bench/bench_compare.py"
    from _nnunet_side import predictor_settings

    result = {
        "meta": {
            "hardware": _hardware(args.threads),
            "device": "cuda" if cuda else "cpu",
            "filters": args.filters,
            "params": params,
            "threads": args.threads,
            "roi": roi,
            "roi_requested": args.roi,
            "roi_weights": "trained" if trained_roi else "random",
            "systems": systems,
            "repeats_requested": args.repeats,
            "repeats_per_system": repeats,
            "engines": {s: {"engine": OURS[s][0], "precision": OURS[s][1] or args.precision} for s in systems if s in OURS},
            "nnunet": {
                "version": "2.8.1",
                "arch": args.arch,
                **{s: predictor_settings(NNUNET[s]) for s in systems if s in NNUNET},
            },
            "int8_calibration": calibration,
            "warmup": warmup,
            "crop_fraction_ours": crop,
            "wall_s": None,
            "command": command,
        },
        "summary": summary,
        "ratios": ratios(summary),
        "export": export,
        "runs": {
            c: {s: [{k: v for k, v in r.items() if k != "breakdown"} for r in v] for s, v in sv.items()} for c, sv in runs.items()
        },
    }
    result["goals"] = goals(result)
    result["meta"]["wall_s"] = time.perf_counter() - t_begin
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if cuda else "cpu"
    atomic_write_json(out / f"compare_{tag}.json", result)
    text = markdown(result)
    atomic_write_text(out / f"compare_{tag}.md", text)
    print("\n" + text)
    print(f"wrote {out / f'compare_{tag}.json'} and {out / f'compare_{tag}.md'} ({result['meta']['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # one line for user errors
        from flare23.errors import Flare23Error

        if isinstance(exc, Flare23Error):
            sys.exit(f"bench_compare: error: {exc}")
        raise
