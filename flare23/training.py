"""Training helpers shared by every bundle: resume from the last checkpoint, safe weight loading.

* :class:`ResumeFromLast` is an ignite handler for ``train#handlers``: when the checkpoint folder
  holds a ``checkpoint_epoch=N.pt`` written by MONAI's ``CheckpointSaver``, it restores model,
  optimiser, scheduler and trainer counters from the newest one at ``Events.STARTED``, so that the
  same training command resumes after an interruption. (MONAI's ``CheckpointLoader`` needs a path
  that exists when the config is parsed; this handler looks when the run starts.)
* :func:`load_weights` loads an untrusted checkpoint with ``weights_only=True`` and refuses
  missing, unexpected or mis-shaped keys with a one-line error instead of a partial load.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from flare23.config import as_bool
from flare23.errors import Flare23Error

_EPOCH_RE = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """Newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` (highest N), or ``None``."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _EPOCH_RE.search(p.name))]
    return max(found)[1] if found else None


def torch_load_safe(path: str | Path, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)`` with one-line errors; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise Flare23Error(f"{path}: checkpoint not found")
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Flare23Error(f"{path}: refused to load checkpoint (not a plain state dict of tensors: {first})") from None
    if not isinstance(obj, dict):
        raise Flare23Error(f"{path}: checkpoint is a {type(obj).__name__}, expected a state dict")
    return obj


def load_weights(network: torch.nn.Module, path: str | Path, map_location="cpu", key: str | None = None) -> torch.nn.Module:
    """Load a state dict into ``network`` strictly; ``key`` selects a sub-dict (e.g. ``"model"``).

    A checkpoint saved by ``CheckpointSaver`` with several objects is handled by picking ``key``
    (default: ``"model"`` when present). Keys or shapes that differ from the network's are an
    error naming the file and the first few offending keys.
    """
    state = torch_load_safe(path, map_location)
    if key is None and "model" in state and isinstance(state["model"], dict):
        key = "model"
    if key is not None:
        if key not in state:
            raise Flare23Error(f"{path}: checkpoint has no entry {key!r} (has {sorted(state)[:5]})")
        state = state[key]
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise Flare23Error(
            f"{path}: checkpoint does not match the network ({len(missing)} missing keys e.g. {missing[:3]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:3]})"
        )
    bad = [k for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        k = bad[0]
        raise Flare23Error(
            f"{path}: checkpoint shapes do not match the network ({len(bad)} tensors, e.g. {k}: "
            f"{tuple(state[k].shape)} vs {tuple(own[k].shape)})"
        )
    network.load_state_dict(state, strict=True)
    return network


class ResumeFromLast:
    """Ignite handler: restore ``load_dict`` from the newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir``.

    Use in ``train#handlers`` together with a MONAI ``CheckpointSaver`` that writes
    ``{"model", "optimizer", "lr_scheduler", "trainer"}`` every epoch (its ``DiskSaver`` writes
    atomically, so a kill during a save never leaves a corrupt file). ``enabled=False`` turns it
    off (``--resume false``).
    """

    def __init__(self, ckpt_dir: str | Path, load_dict: dict, enabled: bool = True, map_location="cpu"):
        self.ckpt_dir = Path(ckpt_dir)
        self.load_dict = load_dict
        self.enabled = as_bool(enabled, "resume")
        self.map_location = map_location
        self.logger = logging.getLogger(__name__)
        self.loaded_from: Path | None = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine) -> None:
        from ignite.handlers import Checkpoint

        if not self.enabled:
            return
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return
        checkpoint = torch_load_safe(path, self.map_location)
        missing = [k for k in self.load_dict if k not in checkpoint]
        if missing:
            raise Flare23Error(f"{path}: cannot resume, checkpoint lacks {missing}")
        prior_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint, strict=True)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise Flare23Error(
                f"{path}: checkpoint is at epoch {engine.state.epoch}, beyond max_epochs {prior_max_epochs}; raise max_epochs to continue"
            )
        engine.state.max_epochs = prior_max_epochs
        self.loaded_from = path
        self.logger.info("resumed from %s at epoch %d, iteration %d", path, engine.state.epoch, engine.state.iteration)
