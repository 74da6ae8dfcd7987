"""``flare23 quickstart``: the whole method on a built-in phantom data set, on a CPU, in minutes.

One command runs every part of the project in order, on data that it makes itself (no download,
no GPU), and writes everything under one folder ``OUT`` (default ``~/flare23_quickstart``, in the home
folder, outside the repository):

1. **phantoms**: a small synthetic FLARE-like data set (:func:`flare23.phantoms.generate_phantoms`)
   with full, partial and pseudo labels, and a separate held-out set (another seed).
2. **data tools** (:mod:`flare23.datatools`, the ``flare23`` subcommands): full training labels
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
5. **evaluation** with the FLARE 2023 rules (:func:`flare23.evaluation.evaluate_folders`) against
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
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from flare23.constants import IMAGE_SUFFIX
from flare23.errors import Flare23Error

logger = logging.getLogger(__name__)

BUNDLES = ("roi_extractor", "organ_seg", "tumor_seg")
#: The fine bundles and their ``flare23 crop --model`` (each trains on its own crop folder ``data/flare23_<model>``).
FINE_MODELS = {"organ_seg": "organ", "tumor_seg": "tumor"}
#: Share of the training time of each bundle (the time guard's allotment).
TRAIN_SHARES = {"roi_extractor": 0.15, "organ_seg": 0.6, "tumor_seg": 0.25}

#: Training settings of the quickstart that differ from the method (METHOD.md), for every bundle, with
#: the reason. Measured on small phantoms (organ model, 4 x 4 x 5 mm, patch 64 x 64 x 32, no
#: augmentation, validation organ DSC): 80 iterations of batch 2 with SGD (lr 0.01 or 0.1, momentum
#: 0.95) gave 0.00 (every voxel background), with Adam lr 3e-3 0.08 (liver 0.8), lr 1e-2 0.11; 160
#: iterations of batch 1 with Adam lr 3e-3, for a third more CPU time, 0.22 (liver 0.83, kidneys
#: 0.74 / 0.51, stomach 0.73). A few hundred iterations are all a CPU affords in minutes.
FAST_TRAINING: dict = {
    "learning_rate": 3e-3,
    "optimizer": {
        "_target_": "torch.optim.Adam",
        "params": "$@network.parameters()",
        "lr": "@learning_rate",
        "weight_decay": "@weight_decay",
    },
}
#: Augmentation probabilities set to 0: minutes of training gain nothing from them, they cost CPU
#: (elastic deformation above all), and left-right mirroring swaps the lateral organs' labels.
NO_AUGMENTATION = {
    "roi_extractor": ("prob_flip", "prob_affine", "prob_brightness", "prob_gamma"),
    "fine": ("prob_rotation", "prob_scaling", "prob_elastic", "prob_brightness", "prob_gamma", "prob_flip"),
}
#: The fine models' Dice in the public code's per-class form (``dice_mode``), which learns small classes sooner.
FINE_LOSS = {"dice_mode": "per_class"}
QUICKSTART_DIFFERENCES = (
    "optimiser Adam, lr 3e-3 with the poly decay, instead of SGD nesterov (momentum 0.95, lr 0.01): SGD from scratch labels "
    "no organ within the few hundred iterations that minutes of CPU allow",
    "fine models: per-class batch Dice (dice_mode per_class, the public code's form) instead of eq. 2's single ratio",
    "fine models: batch 1 instead of 2 (more, cheaper steps learn faster per CPU second)",
    "no data augmentation (probabilities 0)",
    "small networks, coarse spacing and small patches (see Settings); validation once, at the end of each training",
)


def _fast(bundle: str, **train) -> dict:
    """Training overrides of one bundle: ``FAST_TRAINING``, no augmentation, the fine models' Dice, then ``train``."""
    kind = "roi_extractor" if bundle == "roi_extractor" else "fine"
    out = {**FAST_TRAINING, **{k: 0.0 for k in NO_AUGMENTATION[kind]}}
    if kind == "fine":
        out.update(FINE_LOSS)
    out.update(train)
    return out


#: The fine models' network and geometry in the ``small`` preset (both models alike).
_SMALL_FINE_NETWORK = {
    "network_def#filters": [8, 16, 32, 64, 64, 64],
    "target_spacing": [4.0, 4.0, 5.0],
    "patch_size": [64, 64, 32],
}

#: Settings per phantom size. ``cases``: training pool (split into training and validation by the
#: datalist tool); ``test_cases``: held-out cases. Per bundle: ``network`` overrides go to its
#: train.json and, inside the pipeline, to its inference.json; ``train`` overrides to train.json only.
PRESETS: dict[str, dict] = {
    "small": {
        "cases": 20,
        "test_cases": 3,
        "validation_fraction": 0.2,
        "crop_margin_mm": None,  # flare23 crop default: the largest training context
        "roi_extractor": {
            "network": {"network_def#filters": [8, 16, 32, 64, 64]},
            "train": _fast("roi_extractor", patch_size=[32, 32, 32], max_epochs=10, epoch_length=10, batch_size=2),
        },
        "organ_seg": {
            "network": dict(_SMALL_FINE_NETWORK),
            "train": _fast("organ_seg", max_epochs=35, epoch_length=10, batch_size=1, sw_batch_size=1),
        },
        "tumor_seg": {
            "network": dict(_SMALL_FINE_NETWORK),
            "train": _fast("tumor_seg", max_epochs=12, epoch_length=10, batch_size=1, sw_batch_size=1),
        },
    },
    "tiny": {
        "cases": 6,
        "test_cases": 1,
        "validation_fraction": 0.2,
        "crop_margin_mm": None,  # flare23 crop default: the largest training context
        "roi_extractor": {
            "network": {"network_def#filters": [4, 8, 8, 8, 8]},
            "train": _fast("roi_extractor", patch_size=[32, 32, 32], max_epochs=2, epoch_length=2, batch_size=2),
        },
        "organ_seg": {
            "network": {"network_def#filters": [4, 8, 8, 8, 8, 8], "target_spacing": [5.0, 5.0, 8.0], "patch_size": [64, 64, 16]},
            "train": _fast("organ_seg", max_epochs=2, epoch_length=2, batch_size=2, sw_batch_size=1),
        },
        "tumor_seg": {
            "network": {"network_def#filters": [4, 8, 8, 8, 8, 8], "target_spacing": [5.0, 5.0, 8.0], "patch_size": [64, 64, 8]},
            "train": _fast("tumor_seg", max_epochs=2, epoch_length=2, batch_size=2, sw_batch_size=1),
        },
    },
}


def _bundles_dir(bundles_dir) -> Path:
    from flare23.segment import BUNDLES_DIR

    root = Path(bundles_dir) if bundles_dir else BUNDLES_DIR
    for name in (*BUNDLES, "pipeline"):
        sub = "inference.json" if name == "pipeline" else "train.json"
        if not (root / name / "configs" / sub).is_file():
            raise Flare23Error(
                f"{root / name / 'configs' / sub}: bundle config not found (pass --bundles_dir pointing at the project's bundles/ folder)"
            )
    return root.resolve()


# --- output and logging -------------------------------------------------------------------------
MARKER = ".flare23_quickstart"
DEFAULT_OUT = "~/flare23_quickstart"
SUBFOLDERS = ("data", "checkpoints", "runs", "predictions", "evaluation", "report", "logs")


def _prepare_out(out, overwrite: bool) -> Path:
    """Create OUT; an earlier quickstart's folders are replaced only with ``overwrite``; foreign content is refused."""
    import shutil

    from flare23.io import ensure_output_dir

    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise Flare23Error(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise Flare23Error(
                f"{out}: folder is not empty and was not written by flare23 quickstart; choose a new or empty folder"
            )
        if not overwrite:
            raise Flare23Error(
                f"{out}: holds an earlier quickstart run; pass --overwrite to replace it, or choose another folder"
            )
        for name in SUBFOLDERS + ("quickstart.json",):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    ensure_output_dir(out)
    (out / MARKER).write_text("written by flare23 quickstart\n", encoding="utf-8")
    return out


class _Logs:
    """Everything that MONAI, ignite and the data tools log goes to ``log_path``; the console gets steps and bars."""

    def __init__(self, log_path: Path):
        self.path = log_path
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        import ignite.engine  # noqa: F401 - create the libraries' loggers now, so that quiet() finds them
        import monai.bundle  # noqa: F401
        import monai.engines  # noqa: F401
        import monai.handlers  # noqa: F401

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(logging.INFO)
        self.stream = self._stack.enter_context(open(self.path, "a", encoding="utf-8"))  # noqa: SIM115
        self._moved: list[tuple[logging.StreamHandler, object]] = []
        root = logging.getLogger()
        self._old_level = root.level
        self._old_handlers = list(root.handlers)
        for h in self._old_handlers:  # e.g. a bundle's logging.conf applied earlier in this process
            root.removeHandler(h)
        root.addHandler(self.handler)
        root.setLevel(logging.INFO)
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        logging.captureWarnings(True)
        self.quiet()
        return self

    def quiet(self) -> None:
        """Send every console handler of every logger (MONAI gives its loggers their own) to the log file.

        Called again after each library call that may create loggers; undone on exit.
        """
        consoles = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
        loggers = [logging.getLogger()] + [x for x in logging.root.manager.loggerDict.values() if isinstance(x, logging.Logger)]
        for lg in loggers:
            for h in lg.handlers:
                if type(h) is logging.StreamHandler and id(h.stream) in consoles:
                    self._moved.append((h, h.setStream(self.stream)))

    def write(self, text: str) -> None:
        """Add tool output (captured stdout) to the log."""
        for line in text.splitlines():
            if line.strip():
                logging.getLogger("flare23.quickstart.tools").info(line)

    def __exit__(self, *exc):
        for handler, stream in reversed(self._moved):
            handler.setStream(stream)
        logging.captureWarnings(False)
        self._stack.close()
        root = logging.getLogger()
        root.removeHandler(self.handler)
        self.handler.close()
        for h in self._old_handlers:
            root.addHandler(h)
        root.setLevel(self._old_level)
        return False


def _say(text: str = "") -> None:
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def _tool(logs: _Logs, fn, *args, **kwargs) -> str:
    """Run a data-tool command with its stdout captured into the log; return its last line (its summary)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args, **kwargs)
    text = buf.getvalue()
    logs.write(text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# --- steps ---------------------------------------------------------------------------------------
class _TrainingGuard:
    """Trainer handler: a tqdm bar over the iterations, and a stop at the end of an epoch once ``deadline`` would pass.

    The stop happens when the next epoch (as long as the last one) would end after ``deadline``.
    When the trainer stops before its last epoch, the validator runs once (as the
    ``ValidationHandler`` would have at the end), so that the best-model checkpoint exists.
    """

    def __init__(self, name: str, validator, val_interval: int, deadline: float | None, total: int):
        from tqdm.auto import tqdm

        self.validator = validator
        self.val_interval = max(1, int(val_interval))
        self.deadline = deadline
        self.stopped_at: int | None = None
        self._epoch_start = time.monotonic()
        self.bar = tqdm(total=total, desc=f"train {name}", unit="it", file=sys.stderr, dynamic_ncols=True)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, engine) -> None:
        self._epoch_start = time.monotonic()

    def _iteration(self, engine) -> None:
        loss = engine.state.output[0]["loss"] if isinstance(engine.state.output, list) else engine.state.output.get("loss")
        self.bar.update(1)
        self.bar.set_postfix(epoch=engine.state.epoch, loss=f"{float(loss):.3f}", refresh=False)

    def _epoch_completed(self, engine) -> None:
        epoch, last = engine.state.epoch, engine.state.max_epochs
        if self.deadline is None or epoch >= last:
            return
        now = time.monotonic()
        if now + (now - self._epoch_start) > self.deadline:
            self.stopped_at = epoch
            if epoch % self.val_interval:
                self.validator.run(epoch)
            engine.terminate()

    def close(self) -> None:
        self.bar.close()


def _disable_progress_bars(parser) -> None:
    """Switch off the bundle's own ignite ProgressBar (the quickstart draws one bar per training)."""
    handlers = parser["train"]["handlers"]
    for item in handlers:
        if isinstance(item, dict) and str(item.get("_target_", "")).endswith("ProgressBar"):
            item["disable"] = True
    if "show_progress" in parser:
        parser["show_progress"] = False


def train_bundle(
    bundle_dir: Path,
    dataset_dir: Path,
    datalist: Path,
    ckpt_dir: Path,
    runs_dir: Path,
    overrides: dict,
    deadline: float | None = None,
    device: str | None = None,
    quiet=lambda: None,
) -> dict:
    """Train one bundle through its ``configs/train.json`` (``ConfigWorkflow``, in this process).

    ``overrides`` are bundle ids (``max_epochs``, ``patch_size``, ``network_def#filters``, ...).
    Validation runs once, at the last epoch (or when ``deadline``, a ``time.monotonic()`` value,
    stops the training early). Returns ``{"model", "epochs", "max_epochs", "iterations", "stopped_at", "seconds"}``.
    """
    t0 = time.monotonic()
    configs = bundle_dir / "configs"
    max_epochs = int(overrides["max_epochs"])
    settings = {
        "bundle_root": str(bundle_dir),
        "dataset_dir": str(dataset_dir),
        "datalist": str(datalist),
        "ckpt_dir": str(ckpt_dir),
        "output_dir": str(runs_dir),
        "num_workers": 0,
        "resume": False,
        "val_interval": max_epochs,
        **overrides,
    }
    if device is not None:
        settings["device"] = f"$torch.device({str(device)!r})"
    meta = configs / "metadata.json"
    meta_file = str(meta) if meta.is_file() else None
    from flare23.segment import config_workflow

    wf = config_workflow(config_file=str(configs / "train.json"), meta_file=meta_file, workflow_type="train", **settings)
    _disable_progress_bars(wf.parser)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    validator = wf.parser.get_parsed_content("validate#evaluator")
    quiet()
    guard = _TrainingGuard(bundle_dir.name, validator, max_epochs, deadline, max_epochs * int(trainer.state.epoch_length or 1))
    guard.attach(trainer)
    try:
        wf.run()
    finally:
        guard.close()
    wf.finalize()
    model = ckpt_dir / "model.pt"
    if not model.is_file():
        raise Flare23Error(f"{ckpt_dir}: the training of {bundle_dir.name} wrote no model.pt (see the log)")
    return {
        "model": model,
        "epochs": int(trainer.state.epoch),
        "max_epochs": max_epochs,
        "iterations": int(trainer.state.iteration),
        "stopped_at": guard.stopped_at,
        "seconds": time.monotonic() - t0,
    }


def run_cascade(
    bundles_dir: Path,
    images: Path,
    out_dir: Path,
    checkpoints: dict,
    sub_overrides: dict,
    device: str | None = None,
    quiet=lambda: None,
):
    """The pipeline bundle on a folder of CTs with given checkpoints and sub-bundle overrides (a bar per case)."""
    from tqdm.auto import tqdm

    from flare23.segment import config_workflow, pipeline_config, user_error_in

    config = pipeline_config(bundles_dir)
    settings = {
        "bundle_root": str(config.parents[1]),
        "dataset_dir": str(images),
        "output_dir": str(out_dir),
        "roi_ckpt": str(checkpoints["roi_extractor"]),
        "organ_ckpt": str(checkpoints["organ_seg"]),
        "tumor_ckpt": str(checkpoints["tumor_seg"]),
        "combined_ckpt": "",
        "roi_overrides": sub_overrides["roi_extractor"],
        "organ_overrides": sub_overrides["organ_seg"],
        "tumor_overrides": sub_overrides["tumor_seg"],
    }
    if device is not None:
        settings["device"] = f"$torch.device({str(device)!r})"
    try:
        wf = config_workflow(config_file=str(config), workflow_type="infer", meta_file=None, **settings)
        wf.initialize()
        evaluator = wf.parser.get_parsed_content("evaluator")
        quiet()
        bar = tqdm(total=len(evaluator.data_loader), desc="pipeline", unit="case", file=sys.stderr, dynamic_ncols=True)
        from ignite.engine import Events

        evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: bar.update(1))
        try:
            wf.run()
        finally:
            bar.close()
        wf.finalize()
    except Exception as exc:
        user = user_error_in(exc)
        if user is not None:
            raise user from None
        raise
    return wf


def _hardware(device) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "CPU": cpu,
        "logical CPUs": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "device": str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(ImportError):
        import monai

        info["monai"] = monai.__version__
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory"] = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    with contextlib.suppress(OSError, AttributeError):
        info["load average at start (1 min)"] = f"{os.getloadavg()[0]:.2f}"
    return info


def default_threads(torch_default: int) -> int:
    """torch's thread count, lowered to the CPUs that other processes leave idle (1-minute load average).

    On a busy machine, OpenMP threads that wait for each other while the OS runs other processes are
    several times slower than one thread (measured on 2 cores at load 5: 23 s against 5 s per
    training iteration), so the quickstart only uses the cores that are free when it starts.
    """
    from flare23.efficiency import available_cpus

    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on Windows
        return torch_default
    free = available_cpus() - load  # the CPUs this process may use (affinity, cgroup quota), not the machine's
    return max(1, min(int(torch_default), int(free + 0.5)))


def _check_positive_int(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise Flare23Error(f"{name} {value!r}: expected a positive integer")
    return int(value)


def _plan(size: str, cases, test_cases, epochs, epoch_length) -> dict:
    import copy

    if size not in PRESETS:
        raise Flare23Error(f"size {size!r}: expected one of {', '.join(PRESETS)}")
    plan = copy.deepcopy(PRESETS[size])
    plan["size"] = size
    cases = _check_positive_int("cases", cases)
    test_cases = _check_positive_int("test_cases", test_cases)
    if cases is not None:
        if cases < 2:
            raise Flare23Error(f"cases {cases}: at least 2 are needed (training and validation)")
        plan["cases"] = cases
    if test_cases is not None:
        plan["test_cases"] = test_cases
    for bundle in BUNDLES:
        train = plan[bundle]["train"]
        if epochs is not None:
            train["max_epochs"] = _check_positive_int("epochs", epochs)
        if epoch_length is not None:
            train["epoch_length"] = _check_positive_int("epoch_length", epoch_length)
    return plan


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
    from flare23.report import write_report

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


def _settings_table(plan, seed, minutes_budget, threads, workers, device, root) -> dict:
    table = {
        "phantom size": plan["size"],
        "training pool (train + validation)": plan["cases"],
        "held-out cases": plan["test_cases"],
        "validation fraction": plan["validation_fraction"],
        "seed": seed,
        "minutes budget": minutes_budget,
        "torch threads": threads if threads is not None else "default (torch's, lowered to the idle cores)",
        "workers": workers,
        "device": device or "default (CUDA if present, else CPU)",
        "bundles": str(root),
    }
    for bundle in BUNDLES:
        table[f"{bundle} overrides"] = json.dumps({**plan[bundle]["network"], **plan[bundle]["train"]})
    return table


def _run_steps(plan, root, out, seed, workers, device, paths, step, logs, training, notes, deadline_total, t_start):
    from flare23 import datatools
    from flare23.evaluation import evaluate_folders
    from flare23.phantoms import generate_phantoms

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
                datatools.merge_labels_cli,
                str(ph / "partial"),
                str(ph / "pseudo"),
                str(paths["merged training labels"]),
                workers=workers,
            )
        )
        _say("      " + _tool(
            logs, datatools.datalist_cli, str(ph / "imagesTr"), str(paths["merged training labels"]), out=str(paths["ROI datalist"]),
            validation_fraction=plan["validation_fraction"], seed=seed,
        ))  # fmt: skip
        for model in FINE_MODELS.values():  # a folder each: the tumor model's case selection must not reach the organ model
            crops = paths[f"{model} model crops"]
            _say("      " + _tool(
                logs, datatools.crop_cli, str(ph / "imagesTr"), str(paths["merged training labels"]), str(crops), model=model,
                margin_mm=plan["crop_margin_mm"], validation_fraction=plan["validation_fraction"], seed=seed, workers=workers,
            ))  # fmt: skip
            _say("      " + _tool(
                logs, datatools.fingerprint_cli, str(crops / "imagesTr"), str(crops / "labelsTr"),
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
        from flare23.report import median_stage_times

        stage_times = median_stage_times(paths["pipeline timings"]) if paths["pipeline timings"].is_file() else {}
        pictures = _pictures(paths, out / "report")
    return summary, stage_times, pictures


def _cases_with_tumor(labels_dir: Path) -> int:
    from flare23.constants import TUMOR_ID
    from flare23.io import list_nifti, load_nifti

    return sum(bool(np.any(load_nifti(p)[0] == TUMOR_ID)) for p in list_nifti(labels_dir))


def _any_label(path: Path) -> bool:
    from flare23.io import load_nifti

    return bool(np.any(load_nifti(path)[0]))


def _pictures(paths: dict, report_dir: Path) -> list[Path]:
    """Axial and coronal pictures of the first held-out case: reference labels beside the prediction."""
    from flare23.io import list_nifti, load_nifti
    from flare23.report import render_overlay

    images = list_nifti(paths["held-out phantoms"] / "imagesTr")
    report_dir.mkdir(parents=True, exist_ok=True)
    image_path = images[0]
    case = image_path.name[: -len(f"{IMAGE_SUFFIX}.nii.gz")]
    image, affine, _ = load_nifti(image_path)
    reference, _, _ = load_nifti(paths["held-out phantoms"] / "labelsTr" / f"{case}.nii.gz")
    pred_path = paths["predictions"] / f"{case}.nii.gz"
    prediction = load_nifti(pred_path)[0] if pred_path.is_file() else np.zeros_like(reference)
    written = []
    for plane in ("axial", "coronal"):
        png = report_dir / f"{case}_{plane}.png"
        render_overlay(
            image, prediction, affine, png, plane, reference=reference,
            title=f"{case}: reference labels (left) and the pipeline's prediction (right)",
        )  # fmt: skip
        written.append(png)
    return written


def segment_command(models: dict) -> str:
    """The ``flare23 segment`` command line that segments ``YOUR_SCAN.nii.gz`` with the checkpoints ``models`` (per bundle).

    Only the three checkpoints: a trained checkpoint carries its own settings. The ``flare23``
    executable is the one of this Python environment where it exists.
    """
    import shlex

    exe = Path(sys.executable).with_name("flare23")
    args = [str(exe) if exe.is_file() else "flare23", "segment", "-i", "YOUR_SCAN.nii.gz", "-o", "YOUR_SCAN_seg.nii.gz"]
    for option, bundle in (("--roi_ckpt", "roi_extractor"), ("--organ_ckpt", "organ_seg"), ("--tumor_ckpt", "tumor_seg")):
        args += [option, str(Path(models[bundle]).absolute())]
    return shlex.join(args)


def _print_results(record: dict, minutes_budget) -> None:
    from flare23.report import metrics_text

    summary = record["summary"]
    _say("")
    _say(f"== metrics: FLARE 2023 rules on {summary.get('n_cases')} held-out phantom case(s) ==")
    _say(metrics_text(summary))
    _say("")
    _say("== timing ==")
    _say("  ".join(f"{k} {v:.0f}s" for k, v in record["step_times"].items()))
    if record["stage_times"]:
        _say(
            "pipeline, median seconds per case and stage: " + ", ".join(f"{k} {v:.2f}" for k, v in record["stage_times"].items())
        )
    budget = f" (budget {minutes_budget:g} min)" if minutes_budget else ""
    _say(f"total: {record['total_seconds'] / 60:.1f} min{budget}")
    for note in record["notes"]:
        _say(f"note: {note}")
    _say(
        "note: for speed, the quickstart trains differently from the method (Adam, batch 1, no augmentation, small networks): see the report"
    )
    _say("")
    _say("== outputs ==")
    for key, value in record["paths"].items():
        _say(f"{key + ':':<28} {value}")
    for pic in record["pictures"]:
        _say(f"{'picture:':<28} {pic}")
    _say("")
    _say("== segment your own scan with the trained models ==")
    _say(record["segment_command"])


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

__all__ = ["PRESETS", "quickstart", "quickstart_cli", "run_cascade", "segment_command", "train_bundle"]
