"""Resume a training from its last complete checkpoint, and fit a training into a wall-clock budget."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from flare23.config import as_bool
from flare23.errors import Flare23Error
from flare23.training.checkpoints import (
    CorruptCheckpointError,
    _check_matches,
    _first_line,
    interrupted_saves,
    list_checkpoints,
    torch_load_safe,
)

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

    ``clock`` (the configs' ``time_budget_clock``): ``"wall"`` (default, ``time.monotonic``) or ``"cpu"``
    (``time.process_time``: this process's CPU time over all its threads, data loading included when it
    runs in the process). ``"cpu"`` gives trainings that share a machine the same compute whatever the
    load, as ``bench/bench_training.py`` needs; a callable is used as is (tests).
    """

    CLOCKS = {"wall": time.monotonic, "cpu": time.process_time}

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
        if clock is None or isinstance(clock, str):
            if (clock or "wall") not in self.CLOCKS:
                raise Flare23Error(f"time_budget_clock must be one of {sorted(self.CLOCKS)}, got {clock!r}")
            clock = self.CLOCKS[clock or "wall"]
        self.clock = clock
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
