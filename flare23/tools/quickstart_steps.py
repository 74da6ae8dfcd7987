"""The quickstart's steps: train a bundle through its own config under a time guard, run the cascade, logs."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
import warnings
from pathlib import Path

from flare23.errors import Flare23Error
from flare23.tools.quickstart_plan import BUNDLES


def _bundles_dir(bundles_dir) -> Path:
    from flare23.inference.segment import BUNDLES_DIR

    root = Path(bundles_dir) if bundles_dir else BUNDLES_DIR
    for name in (*BUNDLES, "pipeline"):
        sub = "inference.json" if name == "pipeline" else "train.json"
        if not (root / name / "configs" / sub).is_file():
            raise Flare23Error(
                f"{root / name / 'configs' / sub}: bundle config not found (pass --bundles_dir pointing at the project's bundles/ folder)"
            )
    return root.resolve()


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
                logging.getLogger("flare23.tools.quickstart.tools").info(line)

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
    from flare23.inference.segment import config_workflow

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

    from flare23.bundles import user_error_in
    from flare23.inference.segment import config_workflow, pipeline_config

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
