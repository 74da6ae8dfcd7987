"""``flare23 quickstart``: the whole method on a built-in phantom data set, on a CPU, in minutes.

One command runs every part of the project in order, on data that it makes itself (no download,
no GPU), and writes everything under one folder ``OUT`` (default ``~/flare23_quickstart``, in the home
folder, outside the repository):

1. **phantoms**: a small synthetic FLARE-like data set (:func:`flare23.tools.phantoms.generate.generate_phantoms`)
   with full, partial and pseudo labels, and a separate held-out set (another seed).
2. **data tools** (:mod:`flare23.data`, the ``flare23`` subcommands): full training labels
   merged from the partial + pseudo labels (``merge-labels``; the generator's full labels are not
   used for training), the ROI datalist, then for each fine model its own folder: crops to the
   labels' bounding box with the model's case selection and its datalist (``crop --model organ`` /
   ``crop --model tumor``, METHOD.md section 2) and its CT fingerprint (``fingerprint``).
3. **training** of the three bundles (``roi_extractor``, ``organ_seg``, ``tumor_seg``) through their
   own ``configs/train.json`` (``monai.bundle.ConfigWorkflow``, in this process), briefly and with
   small networks: only ids of the bundle contract are overridden (``dataset_dir``, ``ckpt_dir``,
   ``output_dir``, ``max_epochs``, ``epoch_length``, ``patch_size``, ``network_def#filters``,
   ``target_spacing``, ``fingerprint_file``, ``num_workers``, ...). A time guard stops a training
   at the end of an epoch when its share of ``minutes_budget`` is spent (said in the output and the
   report) and then validates once so that ``model.pt`` exists.
4. **pipeline**: the pipeline bundle (``bundles/pipeline/configs/inference.json``) on the held-out
   CTs with the three trained checkpoints and the same network overrides.
5. **evaluation** with the FLARE 2023 rules (:func:`flare23.evaluation.evaluate.evaluate_folders`) against
   the held-out full labels.
6. **report**: ``OUT/report/report.md`` (metrics, timings, hardware, settings, paths) and PNG
   pictures of one held-out case (axial and coronal slice, reference beside prediction).

Last, it prints the one ``flare23 segment`` command that segments a scan of your own with the three
checkpoints it trained (also in the report and, as ``segment_command``, in ``OUT/quickstart.json``).

To learn anything in minutes on a CPU, the trainings differ from the method in a few documented
ways (:data:`QUICKSTART_DIFFERENCES`, listed in the report): Adam instead of SGD, no augmentation,
the per-class Dice form, small networks at a coarse spacing. Everything else (data preparation,
networks' structure, loss, patch selection, the cascade, post-processing, evaluation) is the
method's. Results on phantoms after a few minutes of CPU training are modest; they are printed and
reported as measured, never selected. Logs of MONAI and of the data tools go to
``OUT/logs/quickstart.log``.

Budget: the defaults (size ``small``: 20 + 3 phantoms of 128 x 128 x 40-80 voxels; 100, 350 and
120 training iterations) are sized to finish in about 15 minutes on 2 idle CPU cores. On a slower
or busier machine the time guard shortens the trainings (at an epoch end) so that the run still
ends near ``minutes_budget``; each cut is printed and reported.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

import numpy as np

from flare23.errors import Flare23Error
from flare23.tools.quickstart_output import (
    DEFAULT_OUT,
    _any_label,
    _cases_with_tumor,
    _pictures,
    _prepare_out,
    _print_results,
    segment_command,
)
from flare23.tools.quickstart_plan import (
    BUNDLES,
    FINE_MODELS,
    PRESETS,
    QUICKSTART_DIFFERENCES,
    TRAIN_SHARES,
    _check_positive_int,
    _hardware,
    _plan,
    _settings_table,
    default_threads,
)
from flare23.tools.quickstart_steps import _bundles_dir, _Logs, _say, _tool, run_cascade, train_bundle


def quickstart(
    out: str | os.PathLike = DEFAULT_OUT,
    cases: int | None = None,
    test_cases: int | None = None,
    seed: int = 0,
    minutes_budget: float | None = 15.0,
    size: str = "small",
    epochs: int | None = None,
    epoch_length: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    bundles_dir: str | os.PathLike | None = None,
) -> dict:
    """Run the quickstart (see the module docstring); print its progress and results; return a summary dict.

    The summary has ``summary`` (the FLARE evaluation), ``stage_times`` (median pipeline seconds
    per stage), ``step_times``, ``total_seconds``, ``training`` (per bundle), ``paths``, ``notes``
    and ``segment_command`` (:func:`segment_command`); it is also written to ``OUT/quickstart.json``.
    """
    import torch

    t_start = time.monotonic()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise Flare23Error(f"seed {seed!r}: expected an integer >= 0")
    seed = int(seed)
    if minutes_budget is not None:
        try:
            minutes_budget = float(minutes_budget)
        except (TypeError, ValueError):
            raise Flare23Error(f"minutes_budget {minutes_budget!r}: expected a number of minutes") from None
        if not minutes_budget > 0:
            minutes_budget = None
    workers = _check_positive_int("workers", workers) or max(1, min(4, os.cpu_count() or 1))
    threads = _check_positive_int("threads", threads)
    plan = _plan(size, cases, test_cases, epochs, epoch_length)
    root = _bundles_dir(bundles_dir)
    out = _prepare_out(out, bool(overwrite))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads if threads is not None else default_threads(old_threads))
    data = out / "data"
    paths = {
        "training phantoms": data / "phantoms",
        "held-out phantoms": data / "heldout",
        "merged training labels": data / "merged_labels",
        "ROI datalist": data / "roi_datalist.json",
        **{f"{m} model crops": data / f"flare23_{m}" for m in FINE_MODELS.values()},
        **{f"{m} model datalist": data / f"flare23_{m}" / "datalist.json" for m in FINE_MODELS.values()},
        **{f"{m} model fingerprint": data / f"flare23_{m}" / "fingerprint.json" for m in FINE_MODELS.values()},
        **{f"{b} checkpoints": out / "checkpoints" / b for b in BUNDLES},
        "TensorBoard logs": out / "runs",
        "predictions": out / "predictions",
        "pipeline timings": out / "predictions" / "timings.csv",
        "pipeline efficiency": out / "predictions" / "efficiency.csv",
        "evaluation per case": out / "evaluation" / "per_case.csv",
        "evaluation summary": out / "evaluation" / "summary.json",
        "report": out / "report" / "report.md",
        "log": out / "logs" / "quickstart.log",
        "run summary": out / "quickstart.json",
    }
    step_times: dict[str, float] = {}
    notes: list[str] = []
    training: dict[str, dict] = {}
    deadline_total = t_start + 60.0 * minutes_budget if minutes_budget else None
    n_steps = 8

    @contextlib.contextmanager
    def step(k: int, key: str, text: str):
        _say(f"[{k}/{n_steps}] {text}")
        t = time.monotonic()
        yield
        step_times[key] = time.monotonic() - t
        _say(f"      done in {step_times[key]:.1f} s (total {time.monotonic() - t_start:.0f} s)")

    _say(f"flare23 quickstart: the whole method on synthetic phantoms -> {out}")
    hardware = _hardware(device)
    _say(
        f"  {hardware['CPU']}, {hardware['logical CPUs']} logical CPUs, torch threads {hardware['torch threads']}, device {hardware['device']}"
    )
    try:
        with _Logs(paths["log"]) as logs:
            result = _run_steps(
                plan, root, out, seed, workers, device, paths, step, logs, training, notes, deadline_total, t_start
            )
    finally:
        torch.set_num_threads(old_threads)
    summary, stage_times, pictures = result
    total = time.monotonic() - t_start
    if minutes_budget and total > 60.0 * minutes_budget:
        notes.append(f"the run took {total / 60:.1f} min, more than the budget of {minutes_budget:g} min")
    with contextlib.suppress(OSError, AttributeError):
        load_end = os.getloadavg()[0]
        hardware["load average at end (1 min)"] = f"{load_end:.2f}"
        load_start = float(hardware.get("load average at start (1 min)", 0.0))
        if load_start > 0.5 * (os.cpu_count() or 1):  # measured before the quickstart's own work
            notes.append(
                f"other processes kept the CPUs busy (load average {load_start:.1f} when the run started, {load_end:.1f} at its "
                f"end with this run's own load, {os.cpu_count()} CPUs): the times are pessimistic and the trainings had less CPU "
                "than on an idle machine"
            )
    tumor_cases = _cases_with_tumor(paths["held-out phantoms"] / "labelsTr")
    notes.append(
        f"{tumor_cases} of {summary.get('n_cases')} held-out case(s) have a tumor; a case with no tumor in the reference and none "
        "predicted scores tumor DSC = NSD = 1, one with a tumor on one side only scores 0 (FLARE rules)"
    )
    step_times_report = dict(step_times)
    command = segment_command({b: training[b]["model"] for b in BUNDLES})
    settings = _settings_table(plan, seed, minutes_budget, threads, workers, device, root)
    from flare23.tools.report import write_report

    write_report(
        paths["report"],
        summary=summary,
        stage_times=stage_times,
        step_times=step_times_report,
        total_seconds=total,
        hardware=hardware,
        settings=settings,
        paths={k: str(v) for k, v in paths.items()} | {f"picture {Path(p).stem}": str(p) for p in pictures},
        pictures=pictures,
        notes=[*notes, *(f"quickstart setting (differs from the method): {d}" for d in QUICKSTART_DIFFERENCES)],
        segment_command=command,
    )
    record = {
        "summary": summary,
        "stage_times": stage_times,
        "step_times": step_times,
        "total_seconds": total,
        "training": {b: {k: (str(v) if isinstance(v, Path) else v) for k, v in t.items()} for b, t in training.items()},
        "settings": settings,
        "hardware": hardware,
        "notes": notes,
        "paths": {k: str(v) for k, v in paths.items()},
        "pictures": [str(p) for p in pictures],
        "segment_command": command,
    }
    from flare23.io import atomic_write_json

    atomic_write_json(paths["run summary"], record)
    _print_results(record, minutes_budget)
    return record


def _run_steps(plan, root, out, seed, workers, device, paths, step, logs, training, notes, deadline_total, t_start):
    from flare23.data.crop import crop_cli
    from flare23.data.datalists import datalist_cli
    from flare23.data.fingerprint import fingerprint_cli
    from flare23.data.labels import merge_labels_cli
    from flare23.evaluation.evaluate import evaluate_folders
    from flare23.tools.phantoms.generate import generate_phantoms

    data = out / "data"
    with step(1, "phantoms", f"phantoms: {plan['cases']} training + {plan['test_cases']} held-out {plan['size']} cases"):
        generate_phantoms(
            paths["training phantoms"], cases=plan["cases"], seed=seed, size=plan["size"], workers=workers, progress=True
        )
        generate_phantoms(
            paths["held-out phantoms"], cases=plan["test_cases"], seed=seed + 1_000_003, size=plan["size"],
            validation_fraction=0.0, workers=workers, progress=True,
        )  # fmt: skip
    with step(2, "data tools", "data tools: merged labels, ROI datalist; per fine model: crops, datalist, fingerprint"):
        ph = paths["training phantoms"]
        _say(
            "      "
            + _tool(
                logs,
                merge_labels_cli,
                str(ph / "partial"),
                str(ph / "pseudo"),
                str(paths["merged training labels"]),
                workers=workers,
            )
        )
        _say("      " + _tool(
            logs, datalist_cli, str(ph / "imagesTr"), str(paths["merged training labels"]), out=str(paths["ROI datalist"]),
            validation_fraction=plan["validation_fraction"], seed=seed,
        ))  # fmt: skip
        for model in FINE_MODELS.values():  # a folder each: the tumor model's case selection must not reach the organ model
            crops = paths[f"{model} model crops"]
            _say("      " + _tool(
                logs, crop_cli, str(ph / "imagesTr"), str(paths["merged training labels"]), str(crops), model=model,
                margin_mm=plan["crop_margin_mm"], validation_fraction=plan["validation_fraction"], seed=seed, workers=workers,
            ))  # fmt: skip
            _say("      " + _tool(
                logs, fingerprint_cli, str(crops / "imagesTr"), str(crops / "labelsTr"),
                str(paths[f"{model} model fingerprint"]), workers=workers,
            ))  # fmt: skip

    sub_overrides = {b: dict(plan[b]["network"]) for b in BUNDLES}
    for b, model in FINE_MODELS.items():
        sub_overrides[b]["fingerprint_file"] = str(paths[f"{model} model fingerprint"])
    reserve = 0.0
    if deadline_total is not None:
        reserve = max(60.0, 0.12 * (deadline_total - t_start))  # pipeline, evaluation and report
    for k, bundle in enumerate(BUNDLES, start=3):
        train = plan[bundle]["train"]
        text = (
            f"train {bundle}: {train['max_epochs']} epochs x {train['epoch_length']} iterations, batch {train['batch_size']}, "
            f"filters {plan[bundle]['network']['network_def#filters']}"
        )
        with step(k, f"train {bundle}", text):
            deadline = None
            if deadline_total is not None:
                remaining = [b for b in BUNDLES[BUNDLES.index(bundle) :]]
                share = TRAIN_SHARES[bundle] / sum(TRAIN_SHARES[b] for b in remaining)
                now = time.monotonic()
                deadline = now + max(0.0, deadline_total - reserve - now) * share
            model = FINE_MODELS.get(bundle)
            overrides = {**plan[bundle]["network"], **train}
            if model:
                overrides["fingerprint_file"] = str(paths[f"{model} model fingerprint"])
            result = train_bundle(
                root / bundle,
                paths[f"{model} model crops"] if model else data,
                paths[f"{model} model datalist"] if model else paths["ROI datalist"],
                paths[f"{bundle} checkpoints"],
                out / "runs" / bundle,
                overrides,
                deadline=deadline,
                device=device,
                quiet=logs.quiet,
            )
            training[bundle] = result
            if result["stopped_at"] is not None:
                note = (
                    f"{bundle}: training stopped by the time budget after epoch {result['stopped_at']} of {result['max_epochs']} "
                    f"({result['iterations']} iterations)"
                )
                notes.append(note)
                _say(f"      {note}")
            _say(f"      {result['iterations']} iterations; best model: {result['model']}")

    with step(6, "pipeline", f"pipeline bundle on {plan['test_cases']} held-out CT(s) with the trained checkpoints"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):  # the pipeline prints its own timing summary: keep it in the log
            run_cascade(
                root,
                paths["held-out phantoms"] / "imagesTr",
                paths["predictions"],
                {b: training[b]["model"] for b in BUNDLES},
                sub_overrides,
                device,
                logs.quiet,
            )
        logs.write(buf.getvalue())
        empty = [p.name for p in sorted(paths["predictions"].glob("*.nii.gz")) if not _any_label(p)]
        if empty:
            note = f"the pipeline found no abdomen (all background) in {len(empty)} held-out case(s): {', '.join(empty)}"
            notes.append(note)
            _say(f"      {note}")
    with step(7, "evaluation", "evaluation with the FLARE 2023 rules against the held-out full labels"):
        summary = evaluate_folders(
            paths["predictions"], paths["held-out phantoms"] / "labelsTr", out / "evaluation", progress=True
        )
    with step(8, "report", "report and pictures"):
        from flare23.tools.report import median_stage_times

        stage_times = median_stage_times(paths["pipeline timings"]) if paths["pipeline timings"].is_file() else {}
        pictures = _pictures(paths, out / "report")
    return summary, stage_times, pictures


def quickstart_cli(
    out: str = DEFAULT_OUT,
    cases: int | None = None,
    test_cases: int | None = None,
    seed: int = 0,
    minutes_budget: float = 15.0,
    size: str = "small",
    epochs: int | None = None,
    epoch_length: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    bundles_dir: str | None = None,
) -> None:
    """Run the whole method on built-in synthetic phantoms (no download, no GPU) and write a report.

    Steps: phantoms -> data tools (merge partial + pseudo labels, datalists, crops, fingerprint) ->
    train roi_extractor, organ_seg, tumor_seg briefly with small networks -> pipeline bundle on
    held-out phantoms -> FLARE 2023 evaluation -> OUT/report/report.md with pictures. Prints the
    metrics table, the timing breakdown, the path of every output and, last, the command that
    segments a scan of your own with the three trained checkpoints.

    Args:
        out: output folder, ~ is the home folder (created; an earlier quickstart folder is replaced only with --overwrite).
        cases: phantoms in the training pool (default {cases}), split into training and validation.
        test_cases: held-out phantoms for the pipeline and the evaluation (default {test_cases}).
        seed: seed of the phantoms and the splits.
        minutes_budget: time budget; a training stops early (at an epoch end) when its share is spent; 0 = none.
        size: phantom size and settings preset: small (default) or tiny (a smoke test).
        epochs: max_epochs of all three trainings (default: the preset's).
        epoch_length: iterations per epoch of all three trainings (default: the preset's).
        threads: torch CPU threads (default: torch's choice, lowered to the cores left idle by other processes).
        device: cpu or cuda (default: CUDA if present, else CPU).
        workers: processes for phantom generation and the data tools (default: the CPU count, at most 4).
        overwrite: replace the results of an earlier quickstart in OUT.
        bundles_dir: the project's bundles/ folder (default: the one beside the installed package).
    """
    quickstart(
        out=out, cases=cases, test_cases=test_cases, seed=seed, minutes_budget=minutes_budget, size=size, epochs=epochs,
        epoch_length=epoch_length, threads=threads, device=device, workers=workers, overwrite=overwrite, bundles_dir=bundles_dir,
    )  # fmt: skip
    return None


if quickstart_cli.__doc__:  # the presets' defaults in the --help text (None under python -OO)
    quickstart_cli.__doc__ = quickstart_cli.__doc__.format(
        **{key: ", ".join(f"{p[key]} for size {size}" for size, p in PRESETS.items()) for key in ("cases", "test_cases")}
    )
