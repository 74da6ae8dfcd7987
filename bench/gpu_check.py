"""GPU check (issue 23 item 5): ours (fp16) against nnU-Net v2 on a lent GPU, inside one hard time budget.

Entry point: ``bash bench/gpu_check.sh`` (it picks a Python with a CUDA torch, installs the carried
wheels, then runs ``python bench/gpu_check.py run``). This file holds the logic; it imports only
the standard library at the top, so that any Python (the GPU image's, nnU-Net's) can run it.

Sub-commands::

    python bench/gpu_check.py run   [--out DIR] [--deadline EPOCH | --budget_s 450] [--dry-run] [--sizes 100,300] ...
    python bench/gpu_check.py probe [--nnunet]          # what this Python has (JSON on the last line)
    python bench/gpu_check.py setup --wheels DIR --site DIR   # install carried wheels (no index, no network)
    python bench/gpu_check.py fetch --dest DIR          # on a machine WITH network: the wheels the GPU image lacks

``run`` measures through ``bench/bench_compare.py``'s command line only (one process per run; its
``--budget_s`` stops rounds), systems ``ours`` (PyTorch, ``--precision fp16`` = autocast on CUDA,
crop = the phantom's label box), ``nnunet`` (nnU-Net v2 at our settings: step 0.8, no mirroring;
interleaved with ours, round by round) and ``nnunet_default`` (as its users run it: step 0.5,
mirroring over the three axes; its own invocation), on 512 x 512 x 100 and x 300 phantoms at the
paper's widths. Before each invocation :func:`plan_runs` decides, from the seconds left and the
estimated seconds per run (defaults first, then the slowest run measured so far, extrapolated to
the other size), which runs fit: first one run of each system and size in priority order (ours
alone if ours + nnU-Net do not fit), then further runs up to ``--max_runs``; what does not fit is
skipped and said so. An invocation still running at the deadline is killed (the runs it had
finished are kept from its log, without device memory); nnU-Net as users run it is also killed
past 2.5x its estimate, which gives a lower bound and leaves the time to the rest. The whole check
never overruns. After each invocation the merged results are written to ``OUT/gpu_check.json`` and
``OUT/gpu_check.md`` (the Markdown that ``bench/README.md`` pastes: GPU, driver, torch / CUDA /
cuDNN versions, runs per median, seconds per case, peak device memory).
per case, peak device memory).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
COMPARE = BENCH / "bench_compare.py"
NNUNET_VENV_PYTHON = BENCH / ".venv-nnunet" / "bin" / "python"

#: bench_compare's system names measured here, in table order
SYSTEMS = ("ours", "nnunet", "nnunet_default")
#: systems planned and run in invocations of their own, after the others of the same size (the slow ones)
FOLLOWERS = ("nnunet_default",)
NNUNET_SYSTEMS = ("nnunet", "nnunet_default")
LABELS = {
    "ours": "ours (ROI + organ + tumor)",
    "nnunet": "nnU-Net v2 at our settings (1 model)",
    "nnunet_default": "nnU-Net v2 as its users run it (1 model)",
}
SETTINGS_TEXT = {
    "nnunet": "step 0.8 (= ours), Gaussian, no mirroring",
    "nnunet_default": "nnU-Net defaults: step 0.5, Gaussian, mirroring z, y, x",
}
PAPER_FILTERS = "32,64,128,256,320,320"  # flare23.constants.FILTERS (checked against it at run time)

#: Initial estimates, seconds per run = const + per_slice * slices (one process: start-up, CUDA, the case).
#: Replaced by measured runs as soon as there are some (:func:`estimate_runs`). GPU: guesses for one
#: H100 at the paper's widths (nnU-Net's preprocessing and export run on the CPU); dry: the 2-core dev box.
DEFAULT_COST = {
    "gpu": {"ours": (10.0, 0.10), "nnunet": (12.0, 0.30), "nnunet_default": (12.0, 0.90)},
    "dry": {"ours": (15.0, 0.50), "nnunet": (40.0, 1.00), "nnunet_default": (300.0, 10.0)},
}
#: per bench_compare invocation: start-up, parameter count, nnU-Net model build; per new size: the phantom
DEFAULT_OVERHEAD_S = {"gpu": 20.0, "dry": 20.0}
DEFAULT_PREP_S = {"gpu": (10.0, 0.10), "dry": (8.0, 0.50)}
RESERVE_S = 12.0  # kept at the end for writing the report
#: the planner fills this share of the seconds left (estimates err); the kill comes only at the deadline
PLAN_SHARE = 0.9
#: nnU-Net as its users run it is killed past this multiple of its estimate (+ 30 s) unless the deadline comes first:
#: the report then gives a lower bound and the time goes to the other runs
FOLLOWER_LIMIT = 2.5

#: modules each side needs (``import`` names); the GPU image lacks the ones that ``fetch`` gets
OURS_MODULES = ("torch", "numpy", "scipy", "skimage", "yaml", "monai", "ignite", "nibabel", "cc3d", "pydicom", "flare23")
NNUNET_MODULES = ("torch", "nnunetv2", "SimpleITK", "dynamic_network_architectures", "batchgenerators",
                  "batchgeneratorsv2", "acvl_utils", "blosc2", "nibabel", "flare23")  # fmt: skip
#: wheels the GPU image ('cuda', python3 3.12) lacks: versions = the project's .venv / bench/.venv-nnunet.
#: Found by running both sides with every other package blocked (the image's list in the device notes).
OURS_WHEELS = ("monai==1.6.1", "pytorch-ignite==0.5.5", "nibabel==5.4.2", "connected-components-3d==4.1.1", "pydicom==3.0.2")
NNUNET_WHEELS = ("nnunetv2==2.8.1", "dynamic-network-architectures==0.4.4", "batchgenerators==0.25.5", "batchgeneratorsv2==0.3.6",
                 "acvl-utils==0.2.6", "blosc2==4.15.0", "ndindex==1.10.1")  # fmt: skip
#: SimpleITK's wheel is 53 MB (one 270 MB library): carried repacked as .tar.xz (28 MB) to fit the 64 MiB a call
SIMPLEITK = "simpleitk==2.5.7"
CARRY_LIMIT_MB = 64.0


# --- pure helpers (tests/test_gpu_check.py) ----------------------------------------------------------
def case_name(size: int) -> str:
    """bench_compare's name of the 512 x 512 x ``size`` phantom."""
    return f"512 x 512 x {int(size)}"


def parse_sizes(text) -> list[int]:
    sizes = [int(v) for v in str(text).split(",") if v.strip()]
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"sizes must be positive slice counts, got {text!r}")
    return sizes


def parse_costs(items) -> dict:
    """``--cost SYSTEM=CONST,PER_SLICE`` items as ``{system: (const, per_slice)}``."""
    out = {}
    for item in items or ():
        name, _, vals = str(item).partition("=")
        parts = vals.split(",")
        if name not in SYSTEMS or len(parts) != 2:
            raise ValueError(f"--cost: expected SYSTEM=CONST,PER_SLICE with SYSTEM in {', '.join(SYSTEMS)}, got {item!r}")
        out[name] = (float(parts[0]), float(parts[1]))
    return out


def extrapolate(seconds: float, slices: int, target: int, const: float) -> float:
    """A run's seconds at ``target`` slices from one at ``slices``: a constant part plus a part proportional to slices.

    The constant is at most half the measured time (a measured run is never scaled below its own constant).
    """
    c = min(float(const), 0.5 * float(seconds))
    return c + (float(seconds) - c) * float(target) / float(slices)


def estimate_runs(sizes, systems, measured: dict, defaults: dict) -> dict:
    """Seconds per run for every ``(size, system)``.

    ``measured``: ``{(size, system): [seconds, ...]}``; ``defaults``: ``{system: (const, per_slice)}``.
    A measured size uses its slowest run (conservative); another size is extrapolated from the
    nearest measured size of the same system (:func:`extrapolate`); a system never measured uses
    its default.
    """
    out = {}
    for system in systems:
        const, per_slice = defaults[system]
        have = {s: max(v) for (s, sy), v in measured.items() if sy == system and v}
        for size in sizes:
            if size in have:
                out[(size, system)] = have[size]
            elif have:
                near = min(have, key=lambda s: (abs(s - size), -s))
                out[(size, system)] = extrapolate(have[near], near, size, const)
            else:
                out[(size, system)] = const + per_slice * size
    return out


def default_units(systems) -> list[tuple[str, ...]]:
    """Planning units: ours and nnU-Net at our settings run in the same rounds (one unit); nnU-Net's defaults alone."""
    lead = tuple(s for s in systems if s not in FOLLOWERS)
    units = [lead] if lead else []
    return units + [(s,) for s in systems if s in FOLLOWERS]


def plan_runs(remaining_s: float, sizes, units, est: dict, *, done: dict | None = None, max_runs: int = 3,
              overhead_s: float = 0.0, prep_s: dict | None = None) -> dict:  # fmt: skip
    """Which runs fit in ``remaining_s`` seconds.

    ``units``: tuples of systems that run together (see :func:`default_units`), in priority order;
    ``est``: ``{(size, system): seconds per run}``; ``done``: ``{(size, system): runs already
    measured}``; ``overhead_s``: paid once per size and unit that get runs (each is one
    bench_compare invocation); ``prep_s``: ``{size: seconds}`` to prepare a phantom not prepared
    yet (paid with the first runs of that size).

    First every ``(size, unit)`` with no run yet gets one, size by size in the order given, units
    in priority order, if it fits in what is left (a unit of several systems that does not fit
    falls back to its first system alone: ours without nnU-Net); then
    further runs one at a time, round-robin (lead units of every size, then followers), while
    they fit and stay below ``max_runs``.

    Returns ``{"runs": {size: {unit: n}}, "seconds": planned total, "skipped": [(size, unit,
    reason)]}``: ``skipped`` lists the units that have no run and got none.
    """
    sizes, units = list(sizes), list(units)
    done = done or {}
    prep_s = prep_s or {}
    left = float(remaining_s)
    alloc = {s: {u: 0 for u in units} for s in sizes}
    skipped = []

    def have(size, unit) -> int:
        return min(int(done.get((size, x), 0)) for x in unit)

    def cost(size, unit) -> float:
        c = sum(float(est[(size, x)]) for x in unit)
        if not alloc[size].get(unit):  # the unit's first run here: one more bench_compare invocation
            c += float(overhead_s)
        if not any(alloc[size].values()):  # the size's first run: its phantom
            c += float(prep_s.get(size, 0.0))
        return c

    def allowed(size, unit) -> bool:
        return have(size, unit) + alloc[size][unit] < max_runs

    def add(size, unit) -> bool:
        nonlocal left
        c = cost(size, unit)
        if c > left or not allowed(size, unit):
            return False
        alloc[size][unit] += 1
        left -= c
        return True

    def replace(size, unit, part) -> None:  # keep the unit's place (priority) in the size's order
        alloc[size] = {(part if u == unit else u): n for u, n in alloc[size].items()}

    for size in sizes:
        for unit in units:
            if have(size, unit) > 0:
                continue
            need = cost(size, unit)
            if add(size, unit):
                continue
            if len(unit) > 1:
                replace(size, unit, unit[:1])  # the first system alone, when the whole unit does not fit
                if add(size, unit[:1]):
                    skipped.append((size, unit[1:], f"needs about {need:.0f} s with {unit[0]}, {max(left, 0.0):.0f} s left"))
                    continue
                replace(size, unit[:1], unit)
            skipped.append((size, unit, f"needs about {need:.0f} s, {max(left, 0.0):.0f} s left"))
    order = [(s, u) for s in sizes for u in alloc[s] if u[0] not in FOLLOWERS]
    order += [(s, u) for s in sizes for u in alloc[s] if u[0] in FOLLOWERS]
    order.sort(key=lambda su: (su[1][0] in FOLLOWERS, sizes.index(su[0])))
    progress = True
    while progress:
        progress = False
        for size, unit in order:
            if have(size, unit) + alloc[size][unit] >= 1 and add(size, unit):  # extras only where coverage exists
                progress = True
    runs = {s: {u: n for u, n in a.items() if n} for s, a in alloc.items()}
    return {"runs": {s: r for s, r in runs.items() if r}, "seconds": float(remaining_s) - left, "skipped": skipped}


def invocation_args(size: int, runs: dict) -> dict:
    """bench_compare's ``--systems``, ``--repeats`` and ``--repeats_nnunet_default`` for one size's planned runs."""
    systems = [x for u, n in runs.items() if n for x in u]
    systems = [s for s in SYSTEMS if s in systems] + [s for s in systems if s not in SYSTEMS]
    lead = [n for u, n in runs.items() if n and u[0] not in FOLLOWERS]
    follow = [n for u, n in runs.items() if n and u[0] in FOLLOWERS]
    repeats = max(lead) if lead else max(follow, default=0)
    return {"size": int(size), "systems": systems, "repeats": repeats, "repeats_default": max(follow, default=0)}


def next_invocation(plan: dict, sizes) -> tuple[int, tuple, int] | None:
    """The first ``(size, unit, runs)`` of a plan: sizes in the order given, units in their priority order."""
    for size in sizes:
        for unit, n in (plan["runs"].get(size) or {}).items():
            if n:
                return size, unit, n
    return None


def compare_command(python: str, inv: dict, *, device: str, filters: str, threads: int, precision: str, budget_s: float,
                    work: str, out: str, nnunet_python: str | None = None, has_default_repeats: bool = True) -> list[str]:  # fmt: skip
    """The bench_compare command line of one invocation (its CLI only: end to end, no export stage, no real CT)."""
    cmd = [python, str(COMPARE), "--device", device, "--sizes", str(inv["size"]), "--no-real", "--systems", ",".join(inv["systems"]),
           "--repeats", str(inv["repeats"]), "--filters", filters, "--threads", str(threads), "--precision", precision,
           "--roi", "oracle", "--export_sizes", "0", "--export_repeats", "0", "--noise_repeats", "0",
           "--budget_s", f"{max(1.0, budget_s):.0f}", "--work", work, "--out", out]  # fmt: skip
    if has_default_repeats and "nnunet_default" in inv["systems"]:
        cmd += ["--repeats_nnunet_default", str(inv["repeats_default"])]
    if any(s in NNUNET_SYSTEMS for s in inv["systems"]):
        if nnunet_python:
            cmd += ["--nnunet_python", nnunet_python]
    else:  # a path that does not exist: bench_compare then builds no nnU-Net model (20-30 s) for a run of ours alone
        cmd += ["--nnunet_python", str(Path(work) / "no-nnunet-in-this-invocation")]
    return cmd


def failed_system(output: str) -> str | None:
    """The system named in bench_compare's failure line (``<system> on 512 x 512 x N failed``), or ``nnunet`` for its model build."""
    found = re.findall(r"(\w+) on 512 x 512 x \d+ failed", output)
    if found:
        return found[-1]
    if "nnU-Net model build failed" in output:
        return "nnunet"
    return None


def network_seconds(system: str, stages: dict) -> float | None:
    """The networks' seconds of one run (ours: ROI + both branches' forward passes and window sums; nnU-Net: its sliding window)."""
    if system.startswith("ours"):
        keys = ("roi", "tumor_network", "organ_network", "tumor_aggregate", "organ_aggregate")
    else:
        keys = ("network",)
    vals = [float(stages[k]) for k in keys if k in stages]
    return sum(vals) if vals else None


def run_record(system: str, raw: dict, invocation: int) -> dict:
    """The fields of one bench_compare run that the report uses."""
    stages = raw.get("stages") or {}
    rec = {
        "invocation": invocation,
        "seconds": float(stages["end_to_end_s"]),
        "network_s": network_seconds(system, stages),
        "peak_torch_mb": raw.get("peak_torch_mb"),
        "peak_device_mb": raw.get("peak_sampled_mb"),
        "peak_rss_mb": raw.get("peak_rss_mb"),
        "stages": stages,
    }
    for k in ("settings", "engine", "precision", "crop_fraction", "roi", "nnunet_settings"):
        if raw.get(k) is not None:
            rec[k] = raw[k]
    return rec


def merge_compare(runs: dict, compare: dict, invocation: int) -> int:
    """Append the runs of one bench_compare JSON (``compare["runs"][case][system]``) to ``runs``; returns how many."""
    n = 0
    for case, per in (compare.get("runs") or {}).items():
        for system, lst in per.items():
            for raw in lst:
                runs.setdefault(case, {}).setdefault(system, []).append(run_record(system, raw, invocation))
                n += 1
    return n


LOG_RUN = re.compile(r"^\s*(?:\|\s*)?round (\d+) (512 x 512 x \d+) (\w+): ([\d.]+) s, peak RSS (\d+) MB", re.M)


def runs_from_log(output: str) -> dict:
    """The runs that bench_compare finished, from its per-run lines (for an invocation killed or failed before its JSON).

    ``{case: {system: [{"seconds", "peak_rss_mb"}]}}``; no device memory (the lines do not give it).
    """
    out: dict = {}
    for _round, case, system, secs, rss in LOG_RUN.findall(output):
        out.setdefault(case, {}).setdefault(system, []).append({"seconds": float(secs), "peak_rss_mb": float(rss)})
    return out


def merge_log_runs(runs: dict, output: str, invocation: int, ours: dict | None = None) -> int:
    """Append :func:`runs_from_log`'s runs to ``runs`` (marked ``from_log``; ``ours``: fields for ours' runs, e.g. the
    precision asked for); returns how many."""
    n = 0
    for case, per in runs_from_log(output).items():
        for system, lst in per.items():
            extra = dict(ours or {}) if system.startswith("ours") else {}
            for r in lst:
                rec = {
                    "invocation": invocation,
                    "from_log": True,
                    "network_s": None,
                    "peak_torch_mb": None,
                    "peak_device_mb": None,
                }
                runs.setdefault(case, {}).setdefault(system, []).append({**rec, **extra, **r})
                n += 1
    return n


def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: dict) -> dict:
    """Per case and system: runs, median seconds, the runs' seconds, median network seconds and peak memories."""
    out = {}
    for case in sorted(runs, key=lambda c: (int(c.split()[-1]) if c.split()[-1].isdigit() else 0, c)):
        per = {}
        for system in [s for s in SYSTEMS if s in runs[case]] + [s for s in runs[case] if s not in SYSTEMS]:
            lst = runs[case][system]
            if not lst:
                continue
            first = lst[0]
            per[system] = {
                "runs": len(lst),
                "seconds": _median([r["seconds"] for r in lst]),
                "seconds_runs": [round(r["seconds"], 2) for r in lst],
                "network_s": _median([r.get("network_s") for r in lst]),
                "peak_torch_mb": _median([r.get("peak_torch_mb") for r in lst]),
                "peak_device_mb": _median([r.get("peak_device_mb") for r in lst]),
                "peak_rss_mb": _median([r.get("peak_rss_mb") for r in lst]),
                "settings": settings_text(system, first),
                "from_log": sum(1 for r in lst if r.get("from_log")),
            }
            if first.get("crop_fraction") is not None:
                per[system]["crop_fraction"] = first["crop_fraction"]
        if per:
            out[case] = per
    return out


def settings_text(system: str, run: dict) -> str:
    """The settings column: ours' engine and precision as its run reports them, nnU-Net's as bench_compare words them."""
    if system.startswith("ours"):
        engine = run.get("engine") or "torch"
        precision = run.get("precision") or "?"
        text = f"{'PyTorch' if engine == 'torch' else engine} {precision}"
        return text + (" autocast" if precision in ("fp16", "bf16") else "")
    if isinstance(run.get("settings"), str):
        return run["settings"]
    return SETTINGS_TEXT.get(system, "")


def ratios(summary: dict) -> dict:
    """Per case: each nnU-Net system's median seconds over ours, and our peak device memory (torch) over theirs."""
    out = {}
    for case, per in summary.items():
        if "ours" not in per:
            continue
        r = {}
        for other in NNUNET_SYSTEMS:
            if other in per:
                r[f"speedup_vs_{other}"] = per[other]["seconds"] / per["ours"]["seconds"]
                a, b = per["ours"].get("peak_torch_mb"), per[other].get("peak_torch_mb")
                if a and b:
                    r[f"memory_vs_{other}"] = a / b
        if r:
            out[case] = r
    return out


def _f(v, nd=1) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def markdown(result: dict) -> str:
    """The report: what ran where, one row per input and system, the ratios, and what was not measured."""
    meta = result["meta"]
    env = meta.get("env") or {}
    gpu = env.get("gpu") or {}
    dry = " (DRY RUN on the CPU: tiny sizes and widths, not results)" if meta.get("dry_run") else ""
    lines = [f"GPU check{dry}, {meta.get('date', '')}: `{meta.get('command', 'bash bench/gpu_check.sh')}`", ""]
    hw = [f"{gpu.get('name', 'no GPU')}" + (f" ({gpu['memory_gib']:.0f} GiB" if gpu.get("memory_gib") else "")
          + (f", driver {gpu['driver']})" if gpu.get("driver") else (")" if gpu.get("memory_gib") else "")),
          f"{env.get('cpu', '?')} ({env.get('cores', '?')} cores)",
          f"torch {env.get('torch', '?')} (CUDA {env.get('cuda') or '-'}, cuDNN {env.get('cudnn') or '-'})",
          f"Python {env.get('python_version', '?')}"]  # fmt: skip
    if meta.get("nnunet_version"):
        hw.append(f"nnU-Net v2 {meta['nnunet_version']}")
    lines.append("Hardware: " + ", ".join(hw) + ".")
    params = meta.get("params") or {}
    nn = f", nnU-Net {params['nnunet']:,} [{params.get('nnunet_network')}]" if params.get("nnunet") else ""
    ours_p = f" (organ network: ours {params['ours_organ']:,} parameters{nn})" if params.get("ours_organ") else ""
    lines += [
        f"Widths {meta.get('filters')}{ours_p}, random weights; ours: PyTorch, precision `{meta.get('precision')}`, crop = the "
        f"box of the phantom's labels (`--roi oracle`); device {meta.get('device')}, {meta.get('threads')} threads per run. "
        "Each run is one process (start-up, CUDA context and model loading included); runs interleaved per input "
        "(bench/bench_compare.py); median over the runs column. Peak device memory: `torch.cuda.max_memory_allocated` "
        "and the whole GPU's used memory sampled every 0.1 s (CUDA context and cache included)."
        + (" On the CPU the 'used' column is the sampled resident memory." if meta.get("device") == "cpu" else ""),
        "",
        "| input | system | settings | runs | s per case (median) | runs s | network s | peak device MB (allocated) "
        "| peak device MB (used) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, per in result.get("summary", {}).items():
        for system, m in per.items():
            settings = m["settings"]
            if m.get("crop_fraction") is not None:
                settings += f", crop {100 * m['crop_fraction']:.0f} % of the volume"
            note = f" ({m['from_log']} from the log: no memory)" if m.get("from_log") else ""
            lines.append(
                f"| {case} | {LABELS.get(system, system)} | {settings} | {m['runs']}{note} | {_f(m['seconds'])} | "
                f"{', '.join(f'{v:.1f}' for v in m['seconds_runs'])} | {_f(m['network_s'])} | {_f(m['peak_torch_mb'], 0)} | "
                f"{_f(m['peak_device_mb'], 0)} | {_f(m['peak_rss_mb'], 0)} |"
            )
    rat = result.get("ratios") or {}
    if rat:
        lines += ["", "| input | nnU-Net as users run it / ours (time) | nnU-Net at our settings / ours (time) | "
                  "ours / nnU-Net as users run it (peak allocated) | ours / nnU-Net at our settings (peak allocated) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for case, r in rat.items():
            speed = [
                f"{r[f'speedup_vs_{o}']:.2f}x" if f"speedup_vs_{o}" in r else "not run" for o in ("nnunet_default", "nnunet")
            ]
            memory = [_f(r.get(f"memory_vs_{o}"), 2) or "-" for o in ("nnunet_default", "nnunet")]
            lines.append(f"| {case} | " + " | ".join(speed + memory) + " |")
    notes = list(result.get("notes") or [])
    if notes:
        lines += ["", "Not measured / notes:"] + [f"- {n}" for n in notes]
    lines += ["", f"Budget {meta.get('budget_s', 0):.0f} s, used {meta.get('wall_s', 0):.0f} s "
              f"({len(result.get('invocations') or [])} bench_compare invocation(s))."]  # fmt: skip
    return "\n".join(lines) + "\n"


def skip_notes(sizes, systems, runs: dict, reasons: dict) -> list[str]:
    """One line per ``(size, system)`` that has no run: why (the planner's or a failure's reason)."""
    out = []
    for size in sizes:
        for system in systems:
            if not runs.get(case_name(size), {}).get(system):
                why = reasons.get(system) or reasons.get((size, system)) or "not run"
                out.append(f"{case_name(size)}, {LABELS.get(system, system)}: {why}")
    return out


# --- probing ---------------------------------------------------------------------------------------
PROBE_CODE = r"""
import importlib, json, os, platform, sys
sys.path.insert(0, sys.argv[2])  # the checkout: flare23 and bench/ import from it, as bench_compare's workers do
mods = sys.argv[1].split(",")
out = {"python": sys.executable, "python_version": platform.python_version(), "modules": {}, "cores": os.cpu_count()}
for m in mods:
    try:
        mod = importlib.import_module(m)
        version = str(getattr(mod, "__version__", "") or "")
        if not version:
            try:
                import importlib.metadata as md
                version = md.version(m)
            except Exception:
                pass
        out["modules"][m] = {"ok": True, "version": version}
    except Exception as e:
        out["modules"][m] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    out["cuda_available"] = bool(torch.cuda.is_available())
    try:
        out["cudnn"] = torch.backends.cudnn.version()
    except Exception:
        out["cudnn"] = None
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "memory_gib": p.total_memory / 2**30, "capability": f"{p.major}.{p.minor}",
                      "count": torch.cuda.device_count()}
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"[:300]
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            out["cpu"] = line.split(":", 1)[1].strip()
            break
except OSError:
    pass
print("PROBE " + json.dumps(out))
"""


def probe(python: str, modules, timeout: float = 120.0) -> dict:
    """What ``python`` can import (and its torch / CUDA), in a subprocess (this process never touches the GPU)."""
    try:
        proc = subprocess.run([python, "-c", PROBE_CODE, ",".join(modules), str(ROOT)], capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"python": python, "error": f"{type(exc).__name__}: {exc}"}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    if not line:
        return {"python": python, "error": (proc.stderr or proc.stdout or "no output").strip()[-500:]}
    return json.loads(line[-1][6:])


def missing(p: dict) -> list[str]:
    if p.get("error"):
        return [f"python ({p['error']})"]
    return [f"{m} ({v['error']})" for m, v in p.get("modules", {}).items() if not v.get("ok")]


def _driver_info() -> dict:
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        if q.returncode == 0 and q.stdout.strip():
            driver, name, mem = [v.strip() for v in q.stdout.splitlines()[0].split(",")[:3]]
            return {"driver": driver, "smi_name": name, "smi_memory": mem}
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    return {}


def compare_capabilities(python: str) -> dict:
    """What this checkout's bench_compare.py offers (read from its ``--help``; it is being edited by others)."""
    try:
        text = subprocess.run([python, str(COMPARE), "--help"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    return {
        "ok": "--budget_s" in text,
        "nnunet_default": "nnunet_default" in text,
        "repeats_nnunet_default": "--repeats_nnunet_default" in text,
    }


# --- running ---------------------------------------------------------------------------------------
def run_logged(cmd: list[str], timeout_s: float, env: dict | None = None) -> tuple[int | None, str, float]:
    """Run ``cmd`` in its own process group, echoing its output; kill the group at ``timeout_s``.

    Returns (exit status or ``None`` if killed, the output, seconds).
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True, env=env)  # fmt: skip
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(f"  {time.monotonic() - t0:6.1f} s | " + line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = None
    reader.join(timeout=5)
    return rc, "".join(lines), time.monotonic() - t0


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(result, indent=1, default=str)), ("gpu_check.md", markdown(result))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def _filters_default(dry: bool) -> str:
    if dry:
        return "2,2,2,2,2,2"
    try:
        from flare23.constants import FILTERS

        return ",".join(map(str, FILTERS))
    except Exception:
        return PAPER_FILTERS


def cmd_run(args) -> int:
    t_start = time.time()
    deadline = float(args.deadline) if args.deadline else t_start + float(args.budget_s)
    mode = "dry" if args.dry_run else "gpu"
    device = "cpu" if args.dry_run else "cuda"
    out = Path(args.out)
    sizes = parse_sizes(args.sizes or ("12,16" if args.dry_run else "100,300"))
    filters = args.filters or _filters_default(args.dry_run)
    threads = int(args.threads or (2 if args.dry_run else (os.cpu_count() or 1)))
    precision = args.precision or ("auto" if args.dry_run else "fp16")
    work = Path(args.work or tempfile.mkdtemp(prefix="flare23-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    temporary = not args.work
    notes: list[str] = []
    reasons: dict = {}
    result = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(t_start)),
            "command": args.command_text or "bash bench/gpu_check.sh",
            "dry_run": bool(args.dry_run),
            "device": device,
            "sizes": sizes,
            "filters": filters,
            "threads": threads,
            "precision": precision,
            "budget_s": deadline - (args.started or t_start),
            "max_runs": args.max_runs,
            "wall_s": 0.0,
        },
        "summary": {},
        "ratios": {},
        "notes": notes,
        "invocations": [],
        "runs": {},
    }

    def finish(code: int) -> int:
        result["summary"] = summarize(result["runs"])
        result["ratios"] = ratios(result["summary"])
        result["notes"] = notes + skip_notes(sizes, SYSTEMS, result["runs"], reasons)
        result["meta"]["wall_s"] = time.time() - (args.started or t_start)
        _write(out, result)
        if temporary:  # phantoms and checkpoints (hundreds of MB at the paper's widths)
            shutil.rmtree(work, ignore_errors=True)
        print("\n" + markdown(result), flush=True)
        print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", flush=True)
        return code

    # 1. environment: this Python (ours) and nnU-Net's; nothing here touches the GPU
    print(f"[gpu_check] {mode} run, budget {deadline - time.time():.0f} s left, out {out}", flush=True)
    from concurrent.futures import ThreadPoolExecutor

    nn_candidates = [p for p in (args.nnunet_python, str(NNUNET_VENV_PYTHON), sys.executable) if p]
    nn_candidates = [c for c in dict.fromkeys(nn_candidates) if Path(c).is_file() or shutil.which(c)]
    with ThreadPoolExecutor(max_workers=2 + len(nn_candidates)) as pool:  # the probes run in parallel (imports are slow)
        ours_future = pool.submit(probe, sys.executable, OURS_MODULES)
        caps_future = pool.submit(compare_capabilities, sys.executable)
        nn_futures = {c: pool.submit(probe, c, NNUNET_MODULES) for c in nn_candidates}
        ours_env, caps = ours_future.result(), caps_future.result()
        nn_probes = {c: f.result() for c, f in nn_futures.items()}
    env = {
        k: ours_env.get(k)
        for k in ("python", "python_version", "torch", "cuda", "cudnn", "cuda_available", "gpu", "cpu", "cores")
    }
    if env.get("gpu"):
        env["gpu"] = {**env["gpu"], **_driver_info()}
    env["ours_missing"] = missing(ours_env)
    result["meta"]["env"] = env
    print(f"[gpu_check] ours' Python {sys.executable}: torch {env.get('torch')}, CUDA {env.get('cuda')}, "
          f"cuda available {env.get('cuda_available')}, GPU {(env.get('gpu') or {}).get('name')}", flush=True)  # fmt: skip
    systems = list(SYSTEMS)
    if env["ours_missing"]:
        print("[gpu_check] MISSING for ours: " + "; ".join(env["ours_missing"]), flush=True)
        notes.append("ours not measured: missing " + "; ".join(env["ours_missing"]))
        return finish(2)
    if not args.dry_run and not env.get("cuda_available"):
        msg = (f"{sys.executable}: torch {env.get('torch')} sees no CUDA device (torch.cuda.is_available() is False): "
               "run this on the GPU machine with its own python3 (set GPU_CHECK_PYTHON), or pass --dry-run")  # fmt: skip
        print("[gpu_check] " + msg, flush=True)
        notes.append(msg)
        return finish(2)
    nn_python, nn_env = None, None
    for cand, p in nn_probes.items():
        if not missing(p) and (args.dry_run or p.get("cuda_available")):
            nn_python, nn_env = cand, p
            break
        nn_env = nn_env or p
        if missing(p):
            print(f"[gpu_check] nnU-Net not usable with {cand}: missing " + "; ".join(missing(p)), flush=True)
        else:
            print(f"[gpu_check] nnU-Net not usable with {cand}: its torch sees no CUDA device", flush=True)
    result["meta"]["bench_compare"] = caps
    if not caps["ok"]:
        notes.append("bench/bench_compare.py --help did not list --budget_s: this checkout's bench_compare cannot be driven")
        return finish(2)
    if nn_python is None:
        why = "nnU-Net v2 not importable here (" + "; ".join(missing(nn_env or {}) or ["its torch sees no CUDA"]) + ")"
        print(f"[gpu_check] {why}: measuring ours alone", flush=True)
        for s in NNUNET_SYSTEMS:
            reasons[s] = why
        systems = ["ours"]
    else:
        result["meta"]["nnunet_python"] = nn_python
        result["meta"]["nnunet_version"] = (nn_env["modules"].get("nnunetv2") or {}).get("version") or "2.8.1"
        result["meta"]["nnunet_torch"] = nn_env.get("torch")
        if not caps["nnunet_default"]:
            reasons["nnunet_default"] = "this checkout's bench_compare.py has no nnunet_default system"
            systems.remove("nnunet_default")
    result["meta"]["systems"] = systems
    _write(out, result)

    # 2. plan, run one unit of one size, re-plan with what was measured; until nothing more fits
    defaults = {s: DEFAULT_COST[mode][s] for s in SYSTEMS}
    defaults.update(parse_costs(args.cost))
    overhead = DEFAULT_OVERHEAD_S[mode]
    pc, ps = DEFAULT_PREP_S[mode]
    prepared: set[int] = set()
    failures = 0
    for _ in range(6 * len(sizes) + 4):
        remaining = deadline - time.time() - RESERVE_S
        units = default_units(systems)
        if not units or remaining <= 0:
            break
        measured = {}
        for c, per in result["runs"].items():
            for system, lst in per.items():
                measured[(int(c.split()[-1]), system)] = [r["seconds"] for r in lst]
        done = {k: len(v) for k, v in measured.items()}
        est = estimate_runs(sizes, systems, measured, defaults)
        plan = plan_runs(PLAN_SHARE * remaining, sizes, units, est, done=done, max_runs=args.max_runs, overhead_s=overhead,
                         prep_s={s: pc + ps * s for s in sizes if s not in prepared})  # fmt: skip
        for size, unit, why in plan["skipped"]:
            for s in unit:
                reasons[(size, s)] = f"skipped by the budget ({why})"
        nxt = next_invocation(plan, sizes)
        if nxt is None:
            break
        size, unit, n = nxt
        inv = invocation_args(size, {unit: n})
        planned = overhead + (0.0 if size in prepared else pc + ps * size) + n * sum(est[(size, s)] for s in unit)
        hard = deadline - time.time() - RESERVE_S
        own_limit = unit[0] in FOLLOWERS and hard > FOLLOWER_LIMIT * planned + 30.0
        limit = FOLLOWER_LIMIT * planned + 30.0 if own_limit else hard
        inv_out = work / f"inv{len(result['invocations'])}"
        cmd = compare_command(sys.executable, inv, device=device, filters=filters, threads=threads, precision=precision,
                              budget_s=min(limit - 15.0, 1.25 * planned + 10.0), work=str(work / "cases"), out=str(inv_out),
                              nnunet_python=nn_python, has_default_repeats=caps["repeats_nnunet_default"])  # fmt: skip
        print(f"[gpu_check] {case_name(size)}: {', '.join(inv['systems'])} x{n}; planned {planned:.0f} s, "
              f"limit {limit:.0f} s ({remaining:.0f} s left)", flush=True)  # fmt: skip
        rc, output, wall = run_logged(cmd, limit, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        index = len(result["invocations"])
        record = {"size": size, "systems": inv["systems"], "repeats": inv["repeats"], "planned_s": planned, "limit_s": limit,
                  "wall_s": wall, "exit": rc, "command": " ".join(cmd[1:])}  # fmt: skip
        result["invocations"].append(record)
        files = sorted(inv_out.glob("compare_*.json"))
        if rc == 0 and files:
            compare = json.loads(files[-1].read_text())
            n_runs = merge_compare(result["runs"], compare, index)
            result["meta"]["params"] = compare.get("meta", {}).get("params") or result["meta"].get("params")
            ran = sum(
                float(x["stages"]["end_to_end_s"])
                for per in compare.get("runs", {}).values()
                for lst in per.values()
                for x in lst
            )
            if size in prepared:  # no phantom to prepare: the invocation's overhead alone
                overhead = max(5.0, wall - ran)
            prepared.add(size)
            record["status"] = f"ok, {n_runs} run(s)"
            if "stopping after" in output:
                notes.append(f"{case_name(size)}: bench_compare stopped its rounds at its budget ({n_runs} run(s) kept)")
            if n_runs == 0:
                notes.append(f"{case_name(size)}: bench_compare finished without runs; stopped")
                break
        elif rc is None:
            kept = merge_log_runs(result["runs"], output, index, {"engine": "torch", "precision": precision})
            record["status"] = f"killed after {wall:.0f} s; {kept} finished run(s) kept from its log (seconds and RSS only)"
            if own_limit:
                bound = (
                    f"a run there takes more than about {max(0.0, wall - overhead):.0f} s" if not kept else f"{kept} run(s) kept"
                )
                for s in unit:
                    reasons[s] = (f"killed after {wall:.0f} s on {case_name(size)} ({FOLLOWER_LIMIT:g}x its estimate + 30 s): "
                                  f"{bound}; not tried again")  # fmt: skip
                    if s in systems:
                        systems.remove(s)
                notes.append(f"{case_name(size)}: {', '.join(unit)} killed at its own limit ({wall:.0f} s); {kept} run(s) kept")
                continue
            notes.append(f"{case_name(size)} ({', '.join(unit)}): still running at the deadline, killed; {kept} finished run(s) "
                         "kept from its log (seconds and RSS only)")  # fmt: skip
            for s in unit:
                reasons[(size, s)] = (f"killed at the deadline after {wall:.0f} s (a run there takes more than about "
                                      f"{max(0.0, wall - overhead):.0f} s)")  # fmt: skip
            break
        else:
            failures += 1
            kept = merge_log_runs(result["runs"], output, index, {"engine": "torch", "precision": precision})
            bad = failed_system(output)
            tail = " / ".join(ln.strip() for ln in output.strip().splitlines()[-3:])[-400:]
            record["status"] = f"failed (exit {rc}): {tail}"
            print(f"[gpu_check] bench_compare failed (exit {rc}); failing system: {bad or 'unknown'}", flush=True)
            drop = list(NNUNET_SYSTEMS) if bad in NNUNET_SYSTEMS else ([bad] if bad in systems else [])
            if kept:
                notes.append(
                    f"{case_name(size)}: {kept} run(s) of the failed invocation kept from its log (seconds and RSS only)"
                )
            if not drop or failures > 2:
                notes.append(f"{case_name(size)}: bench_compare failed (exit {rc}): {tail}; stopped")
                break
            for s in drop:
                if s in systems:
                    systems.remove(s)
                reasons[s] = f"failed on {case_name(size)}: {tail}"
        _write(out, {**result, "summary": summarize(result["runs"])})
    else:
        notes.append("stopped after the maximum number of invocations")
    return finish(0 if result["runs"] else 1)


# --- setting up a bare machine ---------------------------------------------------------------------
def cmd_setup(args) -> int:
    """Install the carried wheels (``*.whl``, no index, no dependencies) and unpack ``*.tar.xz`` into ``--site``."""
    import tarfile

    wheels, site = Path(args.wheels), Path(args.site)
    site.mkdir(parents=True, exist_ok=True)
    whl = sorted(wheels.glob("*.whl"))
    rc = 0
    if whl:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--disable-pip-version-check", "--target", str(site), *map(str, whl)]  # fmt: skip
        rc = subprocess.run(cmd).returncode
        print(f"[gpu_check] pip install of {len(whl)} wheel(s) into {site}: exit {rc}", flush=True)
    for t in sorted(wheels.glob("*.tar.xz")):
        with tarfile.open(t) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(site, filter="data")
            else:
                tar.extractall(site)
        print(f"[gpu_check] unpacked {t.name} into {site}", flush=True)
    return rc


def cmd_fetch(args) -> int:
    """Download (here, with network) the wheels the GPU image lacks, for CPython ``--python_version`` on x86-64 Linux."""
    import tarfile
    import zipfile

    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    plat = []
    for p in (
        "manylinux_2_28_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux1_x86_64",
    ):
        plat += ["--platform", p]
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", args.python_version,
            "--implementation", "cp", *plat, "--disable-pip-version-check", "-q"]  # fmt: skip
    specs = list(OURS_WHEELS) + ([] if args.ours_only else list(NNUNET_WHEELS))
    for spec in specs:
        if subprocess.run([*base, "-d", str(dest), spec]).returncode != 0:
            print(f"[gpu_check] no binary wheel for {spec}: building one (pure Python)", flush=True)
            if subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest), spec]).returncode != 0:
                print(f"[gpu_check] FAILED to get {spec}", flush=True)
                return 1
    if not args.ours_only:
        name = SIMPLEITK.replace("==", "-")
        packed = dest / f"{name}.tar.xz"
        if not packed.is_file():
            with tempfile.TemporaryDirectory() as tmp:
                if subprocess.run([*base, "-d", tmp, SIMPLEITK]).returncode != 0:
                    print(f"[gpu_check] FAILED to get {SIMPLEITK}", flush=True)
                    return 1
                whl = next(Path(tmp).glob("*.whl"))
                unpacked = Path(tmp) / "x"
                zipfile.ZipFile(whl).extractall(unpacked)
                print(f"[gpu_check] repacking {whl.name} ({whl.stat().st_size / 2**20:.1f} MiB) as {packed.name} (xz -9, minutes) ...",
                      flush=True)  # fmt: skip
                part = packed.with_suffix(".part")
                names = sorted(item.name for item in unpacked.iterdir())
                if shutil.which("xz") and shutil.which("tar"):  # multi-threaded: minutes instead of a quarter of an hour
                    env = dict(os.environ, XZ_OPT="-9 -T0")
                    if subprocess.run(["tar", "-C", str(unpacked), "-cJf", str(part), *names], env=env).returncode != 0:
                        print("[gpu_check] FAILED to pack SimpleITK with tar/xz", flush=True)
                        return 1
                else:
                    with tarfile.open(part, "w:xz", preset=9) as tar:
                        for name in names:
                            tar.add(unpacked / name, arcname=name)
                os.replace(part, packed)
    total = sum(f.stat().st_size for f in dest.iterdir() if f.is_file()) / 2**20
    for f in sorted(dest.iterdir()):
        print(f"  {f.stat().st_size / 2**20:7.1f} MiB  {f.name}")
    print(
        f"[gpu_check] {total:.1f} MiB in {dest} (the device call carries at most {CARRY_LIMIT_MB:.0f} MiB with the working tree)"
    )
    return 0 if total < CARRY_LIMIT_MB - 4 else 3


def cmd_probe(args) -> int:
    mods = NNUNET_MODULES if args.nnunet else OURS_MODULES
    p = probe(sys.executable, mods)
    for m in missing(p):
        print(f"MISSING {m}")
    print(json.dumps(p))
    return 1 if missing(p) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure (see the module docstring)")
    r.add_argument("--out", default=os.environ.get("OUT") or str(BENCH / "results" / "gpu"))
    r.add_argument("--budget_s", type=float, default=450.0, help="seconds from now (ignored with --deadline)")
    r.add_argument("--deadline", type=float, default=None, help="absolute end, seconds since the epoch")
    r.add_argument("--started", type=float, default=None, help="when the whole check started (epoch; for the report)")
    r.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="CPU, tiny sizes and widths")
    r.add_argument("--sizes", default=None, help="slice counts (default 100,300; dry run 12,16)")
    r.add_argument("--filters", default=None, help="widths (default the paper's; dry run 2,2,2,2,2,2)")
    r.add_argument("--threads", type=int, default=None, help="threads per run (default all cores; dry run 2)")
    r.add_argument("--precision", default=None, help="ours' precision (default fp16; dry run auto)")
    r.add_argument("--max_runs", type=int, default=3, help="runs per system and size at most")
    r.add_argument("--cost", action="append", default=[], metavar="SYSTEM=CONST,PER_SLICE",
                   help="initial estimate of a run's seconds (const + per_slice * slices) instead of the built-in one")  # fmt: skip
    r.add_argument("--nnunet_python", default=os.environ.get("GPU_CHECK_NNUNET_PYTHON") or None)
    r.add_argument("--work", default=None)
    r.add_argument("--command_text", default=None, help=argparse.SUPPRESS)
    s = sub.add_parser("setup", help="install carried wheels into a folder (no network)")
    s.add_argument("--wheels", required=True)
    s.add_argument("--site", required=True)
    f = sub.add_parser("fetch", help="download the wheels the GPU image lacks (needs network; run it here, not there)")
    f.add_argument("--dest", default=str(ROOT / "build" / "gpu_wheels"))
    f.add_argument("--python_version", default="3.12")
    f.add_argument("--ours_only", action="store_true")
    p = sub.add_parser("probe", help="what this Python can import")
    p.add_argument("--nnunet", action="store_true")
    args = ap.parse_args(argv)
    return {"run": cmd_run, "setup": cmd_setup, "fetch": cmd_fetch, "probe": cmd_probe}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
