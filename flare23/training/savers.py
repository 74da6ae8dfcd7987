"""Crash-safe checkpoint savers for ignite / MONAI.

:class:`SafeCheckpointSaver` is MONAI's ``CheckpointSaver`` with a crash-safe writer,
:class:`AtomicDiskSaver` (the reasons are in :mod:`flare23.training.checkpoints`). Both derive from
ignite / MONAI classes, which take seconds to import: this module is imported only by the training
configs, never by inference.
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import ignite.distributed as idist
from ignite.handlers.checkpoint import BaseSaveHandler, Checkpoint
from monai.handlers import CheckpointSaver

from flare23.training.checkpoints import _TMP_RE, _fsync_dir, save_checkpoint_atomic

logger = logging.getLogger(__name__)


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
