"""Checkpoint files: listing and choosing them, loading an untrusted one safely (``weights_only=True``, every key checked), writing one atomically."""

from __future__ import annotations

import logging
import os
import pickle
import re
import stat
import zipfile
from pathlib import Path

import torch

from flare23.config import as_bool
from flare23.errors import Flare23Error
from flare23.io import atomic_path

logger = logging.getLogger(__name__)


_EPOCH_RE = re.compile(r"checkpoint_epoch=(\d+)\.pt$")
#: temporary files of :func:`flare23.io.atomic_path`: ``.<target name>.<random>.tmp.pt``
_TMP_RE = re.compile(r"^\.(?P<target>.+\.pt)\.[A-Za-z0-9_]+\.tmp\.pt$")


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


#: The module names of DynUNet's deep-supervision heads (training outputs only): the heads themselves, and the
#: same modules again in the skip layers that feed them (a state dict lists a shared module under both names).
HEAD_NAMES = ("deep_supervision_heads", "super_head")
#: The entries of a checkpoint written by a training (:mod:`flare23.models.trained`): weights and settings.
TRAINED_KEYS = frozenset({"model", "settings"})


def _head_of(key: str) -> tuple[str, str] | None:
    """``(owner, head name)`` of a deep-supervision head's key (owner: the key prefix of the module that holds it); None for other keys."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in HEAD_NAMES:
            return "".join(p + "." for p in parts[:i]), part
    return None


def unused_head_keys(network: torch.nn.Module, state, prefix: str = "") -> list[str]:
    """Keys of ``state`` (under ``prefix``) that hold deep-supervision heads ``network`` was built without.

    The fine models train with DynUNet's deep-supervision heads and infer without them (a DynUNet with
    heads cannot be scripted, and inference never uses them), so their trained weights carry head tensors
    (``deep_supervision_heads.*``, and the same modules as ``skip_layers...super_head.*``) that the
    inference network has no place for. Those keys, and only those, are dropped *by name*: the heads of a
    module that exists in ``network`` and has no such heads of its own. A head key where the module has
    heads (another ``deep_supr_num``) and every other key still has to match exactly.
    """
    own = [prefix + k for k in network.state_dict()]
    own_set = set(own)
    modules = {prefix} | {"".join(p + "." for p in k.split(".")[:i]) for k in own for i in range(1, k.count(".") + 1)}
    own_heads = {_head_of(k) for k in own} - {None}
    dropped = []
    for key in state:
        if not isinstance(key, str) or key in own_set or not key.startswith(prefix):
            continue
        head = _head_of(key)
        if head is not None and head[0] in modules and head not in own_heads:
            dropped.append(key)
    return dropped


def _trained_state_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` pre-hook of the inference networks (:func:`accept_trained_state`)."""
    if not prefix and set(state_dict) and set(state_dict) <= TRAINED_KEYS and isinstance(state_dict.get("model"), dict):
        if not TRAINED_KEYS & (set(module._modules) | set(module._parameters) | set(module._buffers)):
            weights = state_dict.pop("model")
            state_dict.clear()
            state_dict.update(weights)
    for key in unused_head_keys(module, state_dict, prefix):
        del state_dict[key]


def accept_trained_state(network: torch.nn.Module) -> torch.nn.Module:
    """Let ``network.load_state_dict`` take a training's checkpoint as it is, strictly otherwise; returns ``network``.

    MONAI's own loaders call ``load_state_dict`` directly: ``monai.bundle ckpt_export`` (the Model Zoo CI's
    TorchScript check, strict, without ``key_in_ckpt``), ``CheckpointLoader`` and MONAI Label. So the
    inference networks (:func:`flare23.models.trained.trained_network`, the pipeline's ``CascadeNetworks``)
    accept, through a pre-hook, what a training wrote: the deep-supervision heads they were built without
    are dropped by name (:func:`unused_head_keys`), and a whole ``model.pt`` of a training
    (``{"model": weights, "settings": ...}``, nothing else) is read as its weights. Any other key, missing
    or unexpected, still fails the strict load.
    """
    network.register_load_state_dict_pre_hook(_trained_state_pre_hook)
    return network


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

    Deep-supervision heads that ``network`` was built without (inference) are dropped by name
    (:func:`unused_head_keys`); every other key must match. A checkpoint saved by ``CheckpointSaver``
    with several objects is handled by picking ``key`` (default: ``"model"`` when present). Keys or shapes that differ from the network's are an
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
    if isinstance(state, dict):  # an inference network without the heads a training wrote: drop them by name
        unused = set(unused_head_keys(network, state))
        state = {k: v for k, v in state.items() if k not in unused}
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
