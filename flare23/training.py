"""Training helpers shared by every bundle: crash-safe checkpoints, resume from the last one, safe weight loading.

* :class:`SafeCheckpointSaver` is MONAI's ``CheckpointSaver`` with a crash-safe writer. MONAI 1.6.1 builds
  ignite's ``DiskSaver`` with ``atomic=False`` (so ``torch.save`` writes straight into
  ``checkpoint_epoch=N.pt``), and ignite 0.5.5's ``Checkpoint`` removes the older file *before* it saves
  the new one: a kill during a save with ``n_saved=1`` leaves one truncated checkpoint and nothing to
  resume from (``tests/test_resume.py`` shows it). :class:`AtomicDiskSaver` writes to a temporary file
  beside the target (:func:`flare23.io.atomic_path`), fsyncs it, renames it over the target, fsyncs the
  folder, and only then deletes the files that ``Checkpoint`` asked it to remove. The saver also takes
  over the ``checkpoint_epoch=N.pt`` files of the run it resumes, so that ``n_saved`` still holds after a
  resume, and its ``state_dict`` carries the best-model tracking (best key metric so far), so that a
  resumed run does not overwrite ``model.pt`` with a worse model.
* :class:`ResumeFromLast` is an ignite handler, attached by the configs' ``run`` (it needs the trainer,
  which a handler inside ``train#handlers`` cannot reference: MONAI's parser rejects that as a circular
  reference). At ``Events.STARTED`` it restores model, optimiser, scheduler and trainer counters from
  the newest complete ``checkpoint_epoch=N.pt``, skipping (with a warning) files that are truncated or
  left by an interrupted save. A scheduler with a ``total_iters`` horizon (``PolynomialLR``) keeps the
  horizon of the *current* config: resuming with a larger ``max_epochs`` continues the poly decay
  towards the new end instead of reaching 0 at the old one.
* :class:`TimeBudget` (configs' ``time_budget_s``) fits a training into a wall-clock budget: it times the
  first epochs and lowers ``max_epochs`` and the poly horizon (:func:`set_horizon`) so that the decay
  completes within the budget.
* :func:`load_weights` loads an untrusted checkpoint with ``weights_only=True`` and refuses missing,
  unexpected or mis-shaped keys with a one-line error instead of a partial load.

``SafeCheckpointSaver`` and ``AtomicDiskSaver`` derive from MONAI / ignite classes, which take seconds to
import: they are built on first access (module ``__getattr__``), so that ``import flare23.training``
stays light for inference.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import pickle
import re
import stat
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from flare23.config import as_bool
from flare23.errors import Flare23Error
from flare23.io import atomic_path

_EPOCH_RE = re.compile(r"checkpoint_epoch=(\d+)\.pt$")
#: temporary files of :func:`flare23.io.atomic_path`: ``.<target name>.<random>.tmp.pt``
_TMP_RE = re.compile(r"^\.(?P<target>.+\.pt)\.[A-Za-z0-9_]+\.tmp\.pt$")

logger = logging.getLogger(__name__)


class CorruptCheckpointError(Flare23Error):
    """A checkpoint file that is truncated or damaged (as opposed to one refused for its content)."""


# --- finding and loading checkpoints -----------------------------------------------------------------------------------


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """The ``checkpoint_epoch=N.pt`` files of ``ckpt_dir``, newest (highest N) first; hidden files are skipped."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if not p.name.startswith(".") and (m := _EPOCH_RE.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """Newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` (highest N), or ``None``; its content is not checked."""
    found = list_checkpoints(ckpt_dir)
    return found[0] if found else None


def interrupted_saves(ckpt_dir: str | Path) -> list[Path]:
    """Temporary files that a save of a ``checkpoint_epoch=N.pt`` left when its process was killed."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if (m := _TMP_RE.match(p.name)) and _EPOCH_RE.search(m.group("target")))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # torch's weights-only refusal starts with a paragraph of advice; the useful line names the global
    useful = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    line = (useful or lines or [type(exc).__name__])[0]
    return line.split(". ")[0]  # the first sentence; torch adds paragraphs of advice


def torch_load_safe(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """``torch.load(weights_only=True)`` with one-line errors; never unpickles arbitrary objects.

    A file that cannot be read to the end (truncated, empty, garbage) raises
    :class:`CorruptCheckpointError`; a complete archive whose pickle asks for anything but tensors and
    plain containers is refused with :class:`Flare23Error` (its payload is not executed). ``mmap=True``
    maps the tensors instead of reading them (to read a checkpoint's settings cheaply).
    """
    path = Path(path)
    if not path.is_file():
        raise Flare23Error(f"{path}: checkpoint not found")
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True, mmap=mmap or None)
    except pickle.UnpicklingError as exc:
        if zipfile.is_zipfile(path):
            raise Flare23Error(
                f"{path}: refused to load checkpoint (not a plain state dict of tensors: {_first_line(exc)})"
            ) from None
        raise CorruptCheckpointError(f"{path}: checkpoint is incomplete or corrupt (not a torch archive)") from None
    except Exception as exc:  # OSError / EOFError / RuntimeError from a truncated or damaged archive
        what = f"{type(exc).__name__}: {_first_line(exc)}" if str(exc).strip() else type(exc).__name__
        raise CorruptCheckpointError(
            f"{path}: checkpoint is incomplete or corrupt ({path.stat().st_size} bytes; {what})"
        ) from None
    if not isinstance(obj, dict):
        raise Flare23Error(f"{path}: checkpoint is a {type(obj).__name__}, expected a state dict")
    return obj


def _check_matches(network: torch.nn.Module, state, path: Path | str) -> None:
    """Raise a one-line error when ``state`` does not fit ``network`` key for key and shape for shape."""
    if not isinstance(state, dict):
        raise Flare23Error(f"{path}: the network's entry is a {type(state).__name__}, expected a state dict")
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise Flare23Error(
            f"{path}: checkpoint does not match the network ({len(missing)} missing keys e.g. {missing[:3]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:3]})"
        )
    bad = [k for k, v in own.items() if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        k = bad[0]
        got = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
        raise Flare23Error(
            f"{path}: checkpoint shapes do not match the network ({len(bad)} tensors, e.g. {k}: {got} vs {tuple(own[k].shape)})"
        )


def transfer_state(network: torch.nn.Module, state, path: str | Path) -> dict:
    """Fit the state dict of a sibling network (the organ model for the tumor model) to ``network``.

    The keys must be the same (same architecture family, same widths). A tensor of the same shape
    is copied; a kernel whose shape differs only where ``network`` has size 1 along a spatial axis
    (the tumor model's deepest transposed convolution has stride 1 along z where the organ model's
    has 2) is summed over that axis, which keeps its response to an input constant along it. Any
    other difference is a one-line error naming the file.
    """
    if not isinstance(state, dict):
        raise Flare23Error(f"{path}: the network's entry is a {type(state).__name__}, expected a state dict")
    own = network.state_dict()
    if set(own) != set(state):
        missing = [k for k in own if k not in state]
        raise Flare23Error(
            f"{path}: cannot transfer weights, the networks differ ({len(missing)} missing keys e.g. {missing[:3]})"
        )
    out, summed = {}, []
    for k, v in own.items():
        src = state[k]
        if not isinstance(src, torch.Tensor):
            raise Flare23Error(f"{path}: cannot transfer weights, {k} is not a tensor")
        if src.shape == v.shape:
            out[k] = src
            continue
        same_lead = src.ndim == v.ndim and src.ndim > 2 and src.shape[:2] == v.shape[:2]
        axes = [i for i in range(2, v.ndim) if src.shape[i] != v.shape[i]] if same_lead else []
        if not same_lead or any(v.shape[i] != 1 for i in axes):
            raise Flare23Error(f"{path}: cannot transfer weights, {k} is {tuple(src.shape)} there and {tuple(v.shape)} here")
        out[k] = src.sum(dim=axes, keepdim=True)
        summed.append(k)
    logger.info("%s: %d tensors transferred, %d kernels summed to size 1 along an axis %s", path, len(out), len(summed), summed)
    return out


def load_weights(
    network: torch.nn.Module, path: str | Path, map_location="cpu", key: str | None = None, transfer: bool = False
) -> torch.nn.Module:
    """Load a state dict into ``network`` strictly; ``key`` selects a sub-dict (e.g. ``"model"``).

    A checkpoint saved by ``CheckpointSaver`` with several objects is handled by picking ``key``
    (default: ``"model"`` when present). Keys or shapes that differ from the network's are an
    error naming the file and the first few offending keys. ``transfer=True`` initialises from a
    sibling network instead (:func:`transfer_state`: the config id ``pretrained_transfer``).
    """
    state = torch_load_safe(path, map_location)
    if key is None and "model" in state and isinstance(state["model"], dict):
        key = "model"
    if key is not None:
        if key not in state:
            raise Flare23Error(f"{path}: checkpoint has no entry {key!r} (has {sorted(state)[:5]})")
        state = state[key]
    if as_bool(transfer, "pretrained_transfer"):  # a command line gives the string "false"
        state = transfer_state(network, state, path)
    _check_matches(network, state, path)
    network.load_state_dict(state, strict=True)
    return network


# --- writing checkpoints -----------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` durable (no-op where folders cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):  # pragma: no cover - Windows
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint_atomic(obj, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    A kill at any moment leaves either the previous ``path`` (or none) or the complete new one, plus at
    worst a hidden ``.<name>.<random>.tmp.pt`` file. The file is readable by group and others, like
    the ones ignite's atomic ``DiskSaver`` writes.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IRGRP | stat.S_IROTH)
    _fsync_dir(path.parent)
    return path


@functools.cache
def _saver_classes() -> dict[str, type]:
    """Build the ignite / MONAI subclasses on first use (importing ignite costs seconds)."""
    import ignite.distributed as idist
    from ignite.handlers.checkpoint import BaseSaveHandler, Checkpoint
    from monai.handlers import CheckpointSaver

    class AtomicDiskSaver(BaseSaveHandler):
        """ignite save handler: :func:`save_checkpoint_atomic`, removals deferred until the next save succeeded.

        ignite's ``Checkpoint`` calls ``remove(old)`` before it saves the new file; here the old file
        is deleted only once the new one is complete on disk. ``filename`` fixes the file name
        (``model.pt``): removing and re-saving it then becomes one atomic replacement. ``stale`` (a
        regex of target names) selects the temporary files of interrupted saves that the first save
        deletes.
        """

        def __init__(
            self, dirname: str | Path, filename: str | None = None, save_on_rank: int = 0, stale: re.Pattern | None = None
        ):
            self.dirname = Path(dirname).expanduser()
            self.filename = filename
            self.save_on_rank = save_on_rank
            self.stale = stale
            self._pending: list[str] = []
            self._swept = False
            if idist.get_rank() == save_on_rank:
                self.dirname.mkdir(parents=True, exist_ok=True)

        def __call__(self, checkpoint, filename: str, metadata=None) -> None:
            if idist.get_rank() != self.save_on_rank:
                return
            name = self.filename or filename
            if not self._swept:
                self._sweep(name)
            save_checkpoint_atomic(checkpoint, self.dirname / name)
            pending, self._pending = self._pending, []
            removed = False
            for old in pending:
                if old != name:
                    (self.dirname / old).unlink(missing_ok=True)
                    removed = True
            if removed:
                _fsync_dir(self.dirname)

        def remove(self, filename: str) -> None:
            if idist.get_rank() == self.save_on_rank:
                self._pending.append(self.filename or filename)

        def _sweep(self, name: str) -> None:
            self._swept = True
            for p in self.dirname.iterdir():
                m = _TMP_RE.match(p.name)
                if m and (m.group("target") == name or (self.stale is not None and self.stale.match(m.group("target")))):
                    logger.warning("removing %s, left by an interrupted checkpoint save", p)
                    p.unlink(missing_ok=True)

    class SafeCheckpointSaver(CheckpointSaver):
        """MONAI's ``CheckpointSaver`` (same arguments) writing through :class:`AtomicDiskSaver`.

        * every file (interval, key metric, final) is written atomically and fsynced, and a file that
          ``n_saved`` retires is deleted only after its successor is complete;
        * at the first interval save, the ``checkpoint_epoch=N.pt`` files already in ``save_dir`` with a
          lower N (those of the run that was resumed) join the rotation, so ``n_saved`` still holds;
        * ``state_dict()`` / ``load_state_dict()`` carry the key-metric tracking (the best score so far, its
          file and its epoch): put the saver of ``model.pt`` in the trainer's save and resume dicts so that a
          resumed run only replaces ``model.pt`` with a better model. Loading also hands the best score and
          epoch to the engine this saver is attached to (MONAI's evaluator keeps its own
          ``state.best_metric``, which a new process starts at -1): without that, the first validation after
          a resume logged "Got new best metric" and "best value ... at epoch" for a worse score, although
          ``model.pt`` correctly kept the better model.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bound = inspect.signature(CheckpointSaver.__init__).bind(self, *args, **kwargs)
            self._metric_sign = -1.0 if bound.arguments.get("key_metric_negative_sign", False) else 1.0
            self._engine = None
            self._adopted = False
            interval = self._interval_checkpoint
            self._interval_re = None
            if interval is not None:
                name = "checkpoint" if len(self.save_dict) > 1 else next(iter(self.save_dict))
                prefix = f"{interval.filename_prefix}_" if interval.filename_prefix else ""
                self._interval_re = re.compile(
                    rf"^{re.escape(prefix + name)}_{re.escape(interval.score_name)}=(\d+)\.{re.escape(interval.ext)}$"
                )
            for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, interval):
                if ckpt is not None:
                    fixed = getattr(ckpt.save_handler, "filename", None)
                    ckpt.save_handler = AtomicDiskSaver(self.save_dir, filename=fixed, stale=self._interval_re)

        def attach(self, engine) -> None:
            self._engine = engine
            super().attach(engine)

        def interval_completed(self, engine) -> None:
            if not self._adopted:
                self._adopted = True
                self._adopt_existing(engine.state.epoch if self.epoch_level else engine.state.iteration)
            super().interval_completed(engine)

        def _adopt_existing(self, current: int) -> None:
            """Put the older interval files of ``save_dir`` under this saver's ``n_saved`` rotation."""
            ckpt = self._interval_checkpoint
            if ckpt is None or ckpt.n_saved is None or self._interval_re is None:
                return
            known = {item.filename for item in ckpt._saved}
            older = sorted(
                (int(m.group(1)), p.name)
                for p in Path(self.save_dir).iterdir()
                if (m := self._interval_re.match(p.name)) and int(m.group(1)) < current and p.name not in known
            )
            if not older:
                return
            keep = older[-ckpt.n_saved :]
            for _, name in older[: len(older) - len(keep)]:
                ckpt.save_handler.remove(name)  # deleted once the next file is safely written
            ckpt._saved.extend(Checkpoint.Item(priority, name) for priority, name in keep)
            ckpt._saved.sort(key=lambda it: it[0])
            self.logger.info("checkpoint rotation (n_saved=%d) now includes %s", ckpt.n_saved, [name for _, name in older])

        def state_dict(self) -> dict:
            # plain floats and ints: a numpy scalar would make the checkpoint unloadable with weights_only=True
            ckpt = self._key_metric_checkpoint
            state = {"_saved": [(float(p), str(f)) for p, f in ckpt._saved] if ckpt is not None else []}
            epoch = getattr(getattr(self._engine, "state", None), "best_metric_epoch", -1)
            if state["_saved"] and isinstance(epoch, int) and epoch > 0:
                state["best_epoch"] = epoch
            return state

        def load_state_dict(self, state_dict: dict) -> None:
            ckpt = self._key_metric_checkpoint
            if ckpt is None:
                return
            ckpt.load_state_dict({"_saved": state_dict["_saved"]})
            epoch = state_dict.get("best_epoch")  # absent in checkpoints written before it was recorded
            if ckpt._saved and epoch is not None and self._engine is not None:
                self._engine.state.best_metric = self._metric_sign * max(p for p, _ in ckpt._saved)
                self._engine.state.best_metric_epoch = int(epoch)

    for cls in (AtomicDiskSaver, SafeCheckpointSaver):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return {"AtomicDiskSaver": AtomicDiskSaver, "SafeCheckpointSaver": SafeCheckpointSaver}


def __getattr__(name: str):
    if name in ("AtomicDiskSaver", "SafeCheckpointSaver"):
        return _saver_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- resuming ------------------------------------------------------------------------------------------------------------


class ResumeFromLast:
    """Ignite handler: restore ``load_dict`` from the newest complete ``checkpoint_epoch=N.pt`` in ``ckpt_dir``.

    Attach it to the trainer (the configs do so in ``run``, from ``train#checkpoint_handlers``) beside a
    :class:`SafeCheckpointSaver` that writes the same dict every epoch. At ``Events.STARTED``:

    * files that cannot be read to the end, and temporary files of interrupted saves, are skipped with
      a warning and the next older checkpoint is used; a file whose pickle is refused by
      ``weights_only=True`` stops the run with a one-line error (never executed, never skipped);
    * the checkpoint must hold every key of ``load_dict`` except ``optional_keys`` (warned about when
      absent); network entries must match key for key and shape for shape before anything is loaded;
    * ``max_epochs`` stays the one of the current run (it may be larger than the checkpoint's);
    * a scheduler with ``total_iters`` keeps the horizon it was built with (``@max_epochs``); when the
      checkpoint's differs, the learning rate is set to the scheduler's closed form at the resumed
      epoch, so the schedule is the one a run with the new ``max_epochs`` would have followed.

    ``enabled=False`` turns it off (``--resume false``). ``loaded_from`` is the file used, or ``None``.
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        load_dict: dict,
        enabled: bool = True,
        map_location="cpu",
        optional_keys: Sequence[str] = (),
    ):
        self.ckpt_dir = Path(ckpt_dir)
        self.load_dict = load_dict
        self.enabled = as_bool(enabled, "resume")
        self.map_location = map_location
        self.optional_keys = tuple(optional_keys)
        self.logger = logging.getLogger(__name__)
        self.loaded_from: Path | None = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def _find(self) -> tuple[Path, dict] | None:
        for tmp in interrupted_saves(self.ckpt_dir):
            self.logger.warning("ignoring %s: left by a checkpoint save that was interrupted", tmp)
        candidates = list_checkpoints(self.ckpt_dir)
        for path in candidates:
            try:
                return path, torch_load_safe(path, self.map_location)
            except CorruptCheckpointError as exc:
                self.logger.warning("skipping %s; trying the previous checkpoint", exc)
        if candidates:
            raise Flare23Error(
                f"{self.ckpt_dir}: no complete checkpoint to resume from ({len(candidates)} damaged); "
                "move them away or pass --resume false"
            )
        return None

    def __call__(self, engine) -> None:
        from ignite.handlers import Checkpoint

        if not self.enabled:
            if existing := list_checkpoints(self.ckpt_dir):
                self.logger.warning(
                    "resume is off, but %s holds %s: a later resumed run would start from it unless it is moved away",
                    self.ckpt_dir, existing[0].name,
                )  # fmt: skip
            return
        found = self._find()
        if found is None:
            return
        path, checkpoint = found
        to_load = dict(self.load_dict)
        missing = [k for k in to_load if k not in checkpoint]
        absent_optional = [k for k in missing if k in self.optional_keys]
        missing = [k for k in missing if k not in self.optional_keys]
        if missing:
            raise Flare23Error(f"{path}: cannot resume, checkpoint lacks {missing} (has {sorted(checkpoint)})")
        for k in absent_optional:
            self.logger.warning("%s has no %r entry (an older checkpoint): that state starts afresh", path, k)
            del to_load[k]
        for k, obj in to_load.items():
            net = obj.module if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) else obj
            if isinstance(net, torch.nn.Module):
                _check_matches(net, checkpoint[k], f"{path} [{k}]")
        horizons = {k: obj.total_iters for k, obj in to_load.items() if _has_horizon(obj)}
        prior_max_epochs = engine.state.max_epochs
        try:
            Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint, strict=True)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise Flare23Error(f"{path}: cannot resume from this checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise Flare23Error(
                f"{path}: checkpoint is at epoch {engine.state.epoch}, beyond max_epochs {prior_max_epochs}; raise max_epochs to continue"
            )
        engine.state.max_epochs = prior_max_epochs
        for k, total in horizons.items():
            self._restore_horizon(to_load[k], total, path)
        self.loaded_from = path
        self.logger.info("resumed from %s at epoch %d, iteration %d", path, engine.state.epoch, engine.state.iteration)

    def _restore_horizon(self, scheduler, total: int, path: Path) -> None:
        old = scheduler.total_iters
        if old == total:
            return
        lr = set_horizon(scheduler, total)
        if lr is None:  # pragma: no cover - every torch scheduler with total_iters has a closed form
            self.logger.warning("%s: lr schedule horizon set from %s to %s; lr left at its checkpoint value", path, old, total)
            return
        self.logger.info(
            "lr schedule horizon: checkpoint %s had %s steps, this run has %s (max_epochs); lr at step %d set to %.6g",
            path.name, old, total, scheduler.last_epoch, lr,
        )  # fmt: skip


def set_horizon(scheduler, total: int) -> float | None:
    """Give a scheduler with ``total_iters`` (``PolynomialLR``) a new horizon and set the learning rate to its
    closed form at the current step, so the schedule is the one a run with that horizon follows from here on.
    Returns the new learning rate of the first group, or ``None`` when the scheduler has no closed form."""
    scheduler.total_iters = int(total)
    closed_form = getattr(scheduler, "_get_closed_form_lr", None)
    if closed_form is None:  # pragma: no cover
        return None
    lrs = closed_form()
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
    return float(lrs[0])


def _has_horizon(obj) -> bool:
    return isinstance(obj, torch.optim.lr_scheduler.LRScheduler) and isinstance(getattr(obj, "total_iters", None), int)


# --- wall-clock budget -------------------------------------------------------------------------------------------------


class TimeBudget:
    """Ignite handler: end a training within ``budget_s`` seconds of wall clock, with its learning-rate decay complete.

    For a job with a time limit (a cluster slot, a borrowed GPU): the configs' ``time_budget_s`` (0: off,
    the default). The first epoch is taken as warm-up (workers, caches, cuDNN autotuning); after each of the
    next ``calibration_epochs`` epochs the handler measures the epoch time (the mean so far, or the last
    epoch's where that is longer; validation included) and, where ``max_epochs`` would not fit in what is
    left, lowers ``max_epochs`` to the number that does and gives ``lr_scheduler`` (a ``PolynomialLR``)
    that horizon, so the poly decay reaches 0 at the new end (:func:`set_horizon`). After calibration it
    only stops the run early, at an epoch end, when the next epoch would not fit. It never raises
    ``max_epochs``. A run may end up to about one epoch after the budget. ``--max_epochs N`` with the N it
    logs gives nearly the same schedule without a budget (only the calibration epochs' learning rates
    differ, by the horizon they were computed with). Under DDP, rank 0's
    decision is broadcast, so every rank stops at the same epoch. The budget counts from ``Events.STARTED``
    (dataset caching before it is not counted); a resumed run gets the whole budget again.
    """

    def __init__(self, budget_s: float = 0.0, lr_scheduler=None, calibration_epochs: int = 2, clock=None):
        try:
            self.budget_s = float(budget_s or 0.0)
        except (TypeError, ValueError):
            raise Flare23Error(f"time_budget_s must be a number of seconds, got {budget_s!r}") from None
        if self.budget_s < 0 or self.budget_s != self.budget_s:
            raise Flare23Error(f"time_budget_s must be >= 0 (0: no budget), got {budget_s!r}")
        if int(calibration_epochs) < 1:
            raise Flare23Error(f"TimeBudget: calibration_epochs must be >= 1, got {calibration_epochs!r}")
        self.lr_scheduler = lr_scheduler
        self.calibration_epochs = int(calibration_epochs)
        self.clock = clock or time.monotonic
        self.logger = logging.getLogger(__name__)
        self.fitted_epochs: int | None = None
        self._t0 = self._t_first = self._t_last = None
        self._done = 0

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if self.budget_s <= 0:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _started(self, engine) -> None:
        self._t0, self._t_first, self._t_last, self._done = self.clock(), None, None, 0

    @staticmethod
    def _agree(value: int) -> int:
        import ignite.distributed as idist

        return int(idist.broadcast(int(value), src=0)) if idist.get_world_size() > 1 else int(value)

    def _epoch_completed(self, engine) -> None:
        now = self.clock()
        self._done += 1
        last, self._t_last = now - (self._t_last or now), now
        if self._done == 1:
            self._t_first = now
            return
        per_epoch = max((now - self._t_first) / (self._done - 1), last)  # the last epoch counts when epochs slow down
        left = self._t0 + self.budget_s - now
        epoch = engine.state.epoch
        if self._done <= 1 + self.calibration_epochs:
            fit = self._agree(epoch + max(1, int(left // per_epoch)) if per_epoch > 0 else engine.state.max_epochs)
            if fit < engine.state.max_epochs:
                engine.state.max_epochs = fit
                self.fitted_epochs = fit
                lr = set_horizon(self.lr_scheduler, fit) if _has_horizon(self.lr_scheduler) else None
                self.logger.info(
                    "time budget %.0f s: %.1f s per epoch, %.0f s left after epoch %d: max_epochs set to %d%s",
                    self.budget_s, per_epoch, left, epoch, fit, "" if lr is None else f" (poly horizon too, lr now {lr:.3g})",
                )  # fmt: skip
        elif self._agree(left < per_epoch and epoch < engine.state.max_epochs):
            self.logger.info(
                "time budget %.0f s: %.0f s left, an epoch takes %.1f s: stopping after epoch %d",
                self.budget_s,
                left,
                per_epoch,
                epoch,
            )
            engine.terminate()
