"""The pipeline's weights: the three checkpoints of the cascade, packed into one file or given one by one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flare23.errors import Flare23Error
from flare23.training.checkpoints import load_weights

if TYPE_CHECKING:
    from flare23.inference.branches import CascadeNetworks

# --- the pipeline: which file holds each model's weights -------------------------------------------------------------
PARTS = ("roi", "organ", "tumor")


def weights_files(roi_ckpt=None, organ_ckpt=None, tumor_ckpt=None, combined_ckpt=None) -> dict:
    """``{"roi": path, "organ": path, "tumor": path}``: the three sub-bundle checkpoints when they all exist,
    else the packed pipeline checkpoint (``flare23 pack``) for all three when it exists, else the paths as given
    (a missing one is reported when the weights load)."""
    given = dict(zip(PARTS, (roi_ckpt, organ_ckpt, tumor_ckpt)))
    if all(p and Path(str(p)).is_file() for p in given.values()):
        return {k: str(v) for k, v in given.items()}
    if combined_ckpt and Path(str(combined_ckpt)).is_file():
        return dict.fromkeys(PARTS, str(combined_ckpt))
    return {k: str(v) if v else "" for k, v in given.items()}


def with_weights(overrides, path, load_pretrain, part: str, device=None) -> dict:
    """A sub-bundle's overrides for the pipeline: its ``ckpt_path`` and ``load_pretrain`` set from the pipeline's ids,
    and its ``device`` the pipeline's (``device``, where given), so that the ids the sub-bundle derives from its
    device (``sw_batch_size``) are those of the device the cascade runs on.

    The sub-bundle then reads the settings its checkpoint carries, as it does when run on its own. Setting
    them inside ``<part>_overrides`` is refused: the pipeline's ``<part>_ckpt`` is the one place.
    """
    overrides = dict(overrides or {})
    for key in ("ckpt_path", "load_pretrain"):
        if key in overrides:
            raise Flare23Error(f"{part}_overrides: {key} is set by the pipeline; use --{part}_ckpt / --load_pretrain instead")
    if device is not None:
        if "device" in overrides:
            raise Flare23Error(f"{part}_overrides: device is set by the pipeline; use --device instead")
        overrides["device"] = torch.device(device)
    return {**overrides, "ckpt_path": str(path or ""), "load_pretrain": load_pretrain}

class WeightsError(Flare23Error):
    """A checkpoint that does not load: fatal for the run, not for one case (every case would fail alike)."""


def _weights_error(exc: BaseException, path) -> WeightsError:
    if isinstance(exc, WeightsError):
        return exc
    text = str(exc).strip()
    message = text if isinstance(exc, Flare23Error) else f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    return WeightsError(message if not path or str(path) in message else f"{path}: {message}")


def pack_checkpoints(roi_ckpt, organ_ckpt, tumor_ckpt, out_path, networks: CascadeNetworks) -> Path:
    """Write ``{"model": {roi.*, organ.*, tumor.*}, "settings": {"parts": ...}}`` (checked by a strict load) atomically.

    The settings each sub-bundle checkpoint carries (:mod:`flare23.models.trained`) go along, so that the packed
    file is used as trained too; a part without settings is packed without them.
    """
    from flare23.io import atomic_path
    from flare23.models.trained import SETTINGS_KEY, read_settings

    parts = {}
    for part, path in zip(PARTS, (roi_ckpt, organ_ckpt, tumor_ckpt)):
        load_weights(getattr(networks, part), path)
        settings = read_settings(path, part)
        if settings is not None:
            parts[part] = settings
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    packed = {"model": {k: v.detach().cpu() for k, v in networks.state_dict().items()}}
    if parts:
        packed[SETTINGS_KEY] = {"parts": parts}
    with atomic_path(out_path) as tmp:
        torch.save(packed, str(tmp))
    return out_path
