"""What a trained model carries: the settings that inference needs, stored in its checkpoint.

A network's weights are only right with the geometry and normalisation they were trained with. Every
training (each bundle's ``train.json``, the quickstart, ``torchrun``) therefore saves, beside the
weights, the network definition, the bundle's geometry ids (``target_spacing``, ``patch_size``,
``overlap``; for the ROI extractor ``inplane_stride``, ``slice_target_mm``, ``clip``), the
normalisation *values* (not a fingerprint path) and the label map, with the bundle's name and version:

* ``model.pt`` and every ``checkpoint_epoch=N.pt`` hold ``{"model": state_dict, "settings": {...}}``,
  all plain containers of numbers and strings, so ``torch.load(..., weights_only=True)`` reads them and
  MONAI Label / MONAI's loaders (``checkpoint.get("model", checkpoint)``) still find the weights.
* :class:`RecordedSettings` is the object the trainer's savers write (``save_dict["settings"]``); on a
  resume it refuses a run whose settings contradict the checkpoint's.
* :class:`TrainedSettings` reads them back at inference. Each bundle's ``inference.json`` takes its
  geometry ids *from* it (``"$@trained.get('target_spacing', <bundle default>)"``), so a checkpoint is
  used as trained with no overrides; an explicit override that contradicts a stored value is refused
  by :meth:`TrainedSettings.check` in one line naming the id and both values. ``overlap`` is stored and
  used by default but may be changed (it trades time for smoothness; the weights do not depend on it).
* :func:`trained_network` is the ``network_def`` of the inference configs: the bundle's network
  arguments as overridable ids (``network_def#filters`` ...), built as the checkpoint says when the
  arguments are the bundle's defaults. MONAI Label instantiates ``network_def`` and loads ``model.pt``
  into it, so it gets the trained widths too.

A checkpoint without settings (written before roi_extractor 0.5.0 / organ_seg and tumor_seg 0.7.0, or by another tool) still loads where the
shapes match, with a one-line warning; the config's values are used.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch

from flare23.config import as_bool
from flare23.errors import Flare23Error
from flare23.models.spec import (
    _FACTORY_ARGS,
    _describe,
    _locate,
    _spec_of,
    build_network,
    bundle_metadata,
    heads_as_asked,
    network_difference,
    network_spec,
    plain,
    same,
)

logger = logging.getLogger(__name__)


#: The checkpoint entry that holds the settings (beside ``"model"``).
SETTINGS_KEY = "settings"
FORMAT = 1


class RecordedSettings:
    """The ``settings`` entry of a training's checkpoints (``save_dict`` of both savers, ``load_dict`` of the resume).

    Args:
        bundle_root: the bundle folder (its ``configs/metadata.json`` gives name, version and labels).
        model_name: ``"roi"``, ``"organ"`` or ``"tumor"``.
        network: the trained network (``@network_def``; a DDP wrapper is unwrapped).
        values: the bundle ids that inference needs (geometry, normalisation values).
    """

    def __init__(self, bundle_root, model_name: str, network: torch.nn.Module, values: dict):
        spec = network_spec(network)
        if spec is None:
            warnings.warn(
                f"{type(getattr(network, 'module', network)).__name__}: its definition cannot be recorded; "
                "inference will need the same network_def",
                stacklevel=2,
            )
        self.settings = {
            "format": FORMAT,
            **bundle_metadata(bundle_root),
            "model": str(model_name),
            "network": spec,
            "values": plain(dict(values)),
        }

    def state_dict(self) -> dict:
        return json.loads(json.dumps(self.settings))  # a deep, plain copy

    def load_state_dict(self, state: dict) -> None:
        """On a resume: the checkpoint's settings must be this run's (weights trained on one grid go on on it)."""
        if not isinstance(state, dict):
            raise Flare23Error(f"cannot resume: the checkpoint's settings are a {type(state).__name__}")
        old, new = state.get("model"), self.settings.get("model")
        if old is not None and not same(old, new):
            raise Flare23Error(f"cannot resume: the checkpoint is the {old} model, this run trains the {new} model")
        if state.get("network") and self.settings.get("network"):
            diff = network_difference(state["network"], self.settings["network"])
            if diff:
                raise Flare23Error(f"cannot resume: the checkpoint was trained with {diff[0]} {diff[1]!r}, this run has {diff[2]!r}")
        old_values, new_values = state.get("values", {}), self.settings["values"]
        for key in old_values:
            if key in new_values and not same(old_values[key], new_values[key]):
                raise Flare23Error(
                    f"cannot resume: the checkpoint was trained with {key} {old_values[key]!r}, this run has {new_values[key]!r}"
                )


# --- inference: reading them back -------------------------------------------------------------------------------------
def read_settings(path, model_name: str | None = None) -> dict | None:
    """The settings stored in checkpoint ``path`` for ``model_name`` (``None`` when it has none).

    A pipeline checkpoint packed by ``flare23 pack`` holds ``{"parts": {"roi": ..., "organ": ..., "tumor": ...}}``.
    A checkpoint of another model (a tumor model given as the organ model) is a one-line error.
    """
    from flare23.training.checkpoints import torch_load_safe

    state = torch_load_safe(path, mmap=True)
    settings = state.get(SETTINGS_KEY) if isinstance(state, dict) else None
    if not isinstance(settings, dict):
        return None
    if "parts" in settings:
        if model_name not in settings["parts"]:
            raise Flare23Error(f"{path}: packed checkpoint has no {model_name!r} model (has {sorted(settings['parts'])})")
        settings = settings["parts"][model_name]
    if model_name and settings.get("model") not in (None, model_name):
        raise Flare23Error(
            f"{path}: this is the {settings.get('model')} model (trained by {settings.get('bundle')}), not the {model_name} model"
        )
    return settings


class TrainedSettings:
    """The settings a checkpoint carries, as a bundle's inference config uses them (``@trained``).

    Args:
        checkpoint: the weights the config will load (``@ckpt_path``); missing or empty: nothing stored.
        config_file: the config whose ``network_def`` holds the bundle's default network arguments (to tell
            an explicit override from a default in :func:`trained_network`).
        model_name: the model the bundle expects (``"roi"``, ``"organ"``, ``"tumor"``).
        enabled: ``@load_pretrain``; ``False`` (random weights) ignores the checkpoint.
    """

    def __init__(self, checkpoint=None, config_file=None, model_name: str | None = None, enabled=True):
        self.path = Path(str(checkpoint)) if checkpoint else None
        self.config_file = Path(str(config_file)) if config_file else None
        self.model_name = model_name
        self.settings: dict | None = None
        if not as_bool(enabled, "load_pretrain") or self.path is None or not self.path.is_file():
            return  # no weights to load: the loader reports a missing checkpoint itself
        self.settings = read_settings(self.path, model_name)
        if self.settings is None:
            warnings.warn(
                f"{self.path}: the checkpoint records no settings (written before roi_extractor 0.5.0 / organ_seg, tumor_seg 0.7.0): the config's network, "
                "spacing, patch size and normalisation are used; they must be the ones it was trained with",
                stacklevel=2,
            )

    @property
    def values(self) -> dict:
        return dict((self.settings or {}).get("values") or {})

    def get(self, key: str, default=None):
        """The stored value of bundle id ``key``, else ``default`` (the bundle's own default)."""
        values = self.values
        return values[key] if key in values else default

    def check(self, _pass: bool = False, **effective) -> None:
        """Refuse any of ``effective`` (id = value in use) that contradicts the stored value, in one line.

        The hint says to leave the id out (inference configs, whose ids default to the stored values), or
        with ``_pass=True`` to pass the stored value (configs whose ids do not read the checkpoint, such as
        the fine bundles' ``evaluate.json`` on top of ``train.json``).
        """
        values = self.values
        for key, value in effective.items():
            if key in values and not same(values[key], value):
                hint = f"pass --{key} {json.dumps(values[key])}" if _pass else f"leave {key} out (the checkpoint's value is the default)"
                raise Flare23Error(f"{key}: {self.path} was trained with {values[key]!r}, but this run sets {value!r}; {hint}")

    def check_network(self, network: torch.nn.Module) -> None:
        """Refuse a network whose definition differs from the stored one, naming the first differing argument."""
        stored = (self.settings or {}).get("network")
        if not stored:
            return
        diff = network_difference(stored, _describe(getattr(network, "module", network)), heads_optional=True)
        if diff:
            name, was, now = diff
            raise Flare23Error(f"{name}: {self.path} was trained with {was!r}, but this run sets {now!r}; pass --{name} {json.dumps(was)}")

    def normalization(self, fingerprint_file="", model_name: str | None = None) -> dict:
        """CT normalisation values: the checkpoint's; a fingerprint file given explicitly must agree with them."""
        from flare23.io import read_fingerprint

        model_name = model_name or self.model_name or "organ"
        if fingerprint_file:
            values = read_fingerprint(fingerprint_file, model_name)
            self.check(normalization=values)
            return values
        return self.get("normalization", read_fingerprint("", model_name))

    # the network ---------------------------------------------------------------------------------------------------
    def _default_args(self) -> dict | None:
        """The network arguments written in ``config_file`` (resolved), or ``None`` when unknown."""
        if self.config_file is None or not self.config_file.is_file():
            return None
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(self.config_file))
        raw = parser["network_def"]
        return {k: parser.get_parsed_content(f"network_def#{k}") for k in raw if k not in ("_target_", *_FACTORY_ARGS)} | {
            "_network": raw.get("network", raw.get("_target_"))
        }

    def network(self, target: str, args: dict) -> torch.nn.Module:
        """The network to load the weights into: the stored definition when ``args`` are the defaults or repeat it, else
        ``target(**args)`` (no stored definition) or a one-line error (a contradiction)."""
        stored = (self.settings or {}).get("network")
        if not stored:
            return _locate(target)(**args)
        asked = _spec_of(target, args)
        diff = network_difference(stored, asked, "network_def#network", heads_optional=True)
        if diff is None:  # the recorded definition on every route: overrides that repeat it build the same class
            return build_network(heads_as_asked(stored, asked))
        defaults = self._default_args()
        if defaults is not None and same(asked, _spec_of(defaults.pop("_network"), defaults)):
            logger.info("%s: network built as recorded in the checkpoint (%s)", self.path, stored["_target_"])
            return build_network(heads_as_asked(stored, asked))
        name, was, now = diff
        raise Flare23Error(
            f"{name}: {self.path} was trained with {was!r}, but this run sets {now!r}; "
            "leave the network_def overrides out (the checkpoint's network is the default)"
        )


def trained_network(settings: TrainedSettings | None = None, network: str = "DynUNet", **args) -> torch.nn.Module:
    """``network_def`` of the inference configs: ``network(**args)`` as the checkpoint in ``settings`` was trained.

    ``network`` is the class (a MONAI short name or a dotted path), ``args`` its arguments, each an id
    that can be overridden as usual (``network_def#filters``). Without stored settings this is
    ``network(**args)``; with them, the stored definition is built when ``args`` are the config's defaults or repeat
    it (the same class on every route, also where the overrides name an equivalent class), and an argument that
    contradicts it is a one-line error. The fine bundles infer without
    the deep-supervision heads they trained with (``deep_supervision`` false: scriptable, and the heads
    are training outputs only); that is not a contradiction. The network's ``load_state_dict`` takes a
    training's checkpoint as written (:func:`flare23.training.checkpoints.accept_trained_state`: the heads
    dropped by name, every other key strict), for MONAI's own loaders too (``ckpt_export``, MONAI Label).
    """
    from flare23.training.checkpoints import accept_trained_state

    net = _locate(network)(**args) if settings is None else settings.network(network, args)
    return accept_trained_state(net)
