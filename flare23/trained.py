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

import inspect
import json
import logging
import math
import warnings
from pathlib import Path

import torch

from flare23.config import as_bool
from flare23.errors import Flare23Error

logger = logging.getLogger(__name__)

#: The checkpoint entry that holds the settings (beside ``"model"``).
SETTINGS_KEY = "settings"
FORMAT = 1
#: Arguments of :func:`trained_network` that are not the network's own.
_FACTORY_ARGS = ("settings", "network")


# --- plain values ------------------------------------------------------------------------------------------------------
def plain(value):
    """``value`` as JSON-like plain containers: tuples become lists, numpy / torch scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, Path):
        return str(value)
    return value


def same(a, b, rel: float = 1e-6) -> bool:
    """Equal as settings: numbers to ``rel`` (``4`` equals ``4.0``), containers element by element."""
    a, b = plain(a), plain(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(same(a[k], b[k], rel) for k in a)
    return a == b


def first_difference(a: dict, b: dict) -> str | None:
    """The first key whose values differ between two dicts (``None`` when they are the same)."""
    for key in list(a) + [k for k in b if k not in a]:
        if key not in a or key not in b or not same(a[key], b[key]):
            return key
    return None


# --- network definitions ---------------------------------------------------------------------------------------------
def _locate(target: str):
    """The class named by a config ``_target_`` (a dotted path, or a MONAI short name such as ``DynUNet``)."""
    from pydoc import locate

    from monai.bundle import ComponentLocator

    if "." not in target:
        module = ComponentLocator().get_component_module_name(target)
        if isinstance(module, list):
            module = module[0] if module else None
        if module:
            target = f"{module}.{target}"
    cls = locate(target)
    if cls is None:
        raise Flare23Error(f"network class {target!r} not found")
    return cls


def _describe(net: torch.nn.Module) -> dict:
    """``{"_target_": dotted class path, <constructor argument>: value, ...}`` read from the instance.

    Each argument of the class's ``__init__`` is taken from the attribute of the same name (DynUNet,
    LightUNet and NnDynUNet keep them); ``res_block`` from DynUNet's block type; an argument kept
    nowhere takes its default (the round trip in :func:`network_spec` proves the result).
    """
    cls = type(net)
    spec = {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name == "res_block" and hasattr(net, "conv_block"):
            from monai.networks.blocks.dynunet_block import UnetResBlock

            spec[name] = net.conv_block is UnetResBlock
        elif hasattr(net, name) and not isinstance(getattr(net, name), torch.nn.Module):
            spec[name] = plain(getattr(net, name))
        elif param.default is not inspect.Parameter.empty:
            spec[name] = plain(param.default)
        else:
            raise Flare23Error(f"{cls.__name__}: cannot read its argument {name!r}")
    return spec


def build_network(spec: dict, device=None) -> torch.nn.Module:
    """Instantiate a network from :func:`network_spec`'s dict (on ``device``; ``"meta"`` allocates nothing)."""
    args = {k: v for k, v in spec.items() if k != "_target_"}
    cls = _locate(spec["_target_"])
    if device is None:
        return cls(**args)
    with torch.device(device):
        return cls(**args)


def _shapes(net: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _spec_of(target: str, args: dict) -> dict:
    """The spec of ``target(**args)`` as :func:`_describe` reads it (built on the meta device: nothing allocated)."""
    cls = _locate(target)
    return _describe(build_network({"_target_": f"{cls.__module__}.{cls.__qualname__}", **args}, device="meta"))


def network_difference(stored: dict, asked: dict, class_id: str = "network_def#_target_") -> tuple[str, object, object] | None:
    """Where two network specs first differ: ``(config id, stored value, asked value)``, or ``None`` when they agree.

    ``class_id`` names the id that chooses the class (``network_def#network`` in the inference configs).
    """
    if same(stored, asked):
        return None
    key = first_difference(stored, asked)
    return (class_id if key == "_target_" else f"network_def#{key}", stored.get(key), asked.get(key))


def network_spec(net: torch.nn.Module) -> dict | None:
    """The definition that rebuilds ``net`` (class and arguments), or ``None`` where it cannot be proven.

    The spec is accepted only when the network it builds has the same module structure (``repr``) and
    the same state-dict keys and shapes as ``net``.
    """
    net = getattr(net, "module", net)  # DistributedDataParallel
    try:
        spec = _describe(net)
        rebuilt = build_network(spec, device="meta")
    except Exception as exc:  # noqa: BLE001 - any failure means: not describable
        logger.debug("network_spec: %s", exc)
        return None
    if repr(rebuilt) != repr(net) or _shapes(rebuilt) != _shapes(net):
        return None
    return spec


# --- training: what the savers write -----------------------------------------------------------------------------------
def bundle_metadata(bundle_root) -> dict:
    """``name``, ``version`` and the output ``channel_def`` of a bundle's ``configs/metadata.json`` (empty if absent)."""
    path = Path(str(bundle_root)) / "configs" / "metadata.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    outputs = meta.get("network_data_format", {}).get("outputs", {})
    channel_def = next(iter(outputs.values()), {}).get("channel_def") if outputs else None
    return {"bundle": meta.get("name"), "version": meta.get("version"), "labels": channel_def}


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
    from flare23.training import torch_load_safe

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
        diff = network_difference(stored, _describe(getattr(network, "module", network)))
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
        """The network to load the weights into: ``target(**args)``, or the stored definition when ``args`` are the defaults."""
        stored = (self.settings or {}).get("network")
        if not stored:
            return _locate(target)(**args)
        asked = _spec_of(target, args)
        diff = network_difference(stored, asked, "network_def#network")
        if diff is None:
            return _locate(target)(**args)
        defaults = self._default_args()
        if defaults is not None and same(asked, _spec_of(defaults.pop("_network"), defaults)):
            logger.info("%s: network built as recorded in the checkpoint (%s)", self.path, stored["_target_"])
            return build_network(stored)
        name, was, now = diff
        raise Flare23Error(
            f"{name}: {self.path} was trained with {was!r}, but this run sets {now!r}; "
            "leave the network_def overrides out (the checkpoint's network is the default)"
        )


def trained_network(settings: TrainedSettings | None = None, network: str = "DynUNet", **args) -> torch.nn.Module:
    """``network_def`` of the inference configs: ``network(**args)`` as the checkpoint in ``settings`` was trained.

    ``network`` is the class (a MONAI short name or a dotted path), ``args`` its arguments, each an id
    that can be overridden as usual (``network_def#filters``). Without stored settings this is
    ``network(**args)``; with them, the stored definition is built when ``args`` are the config's
    defaults, and an argument that contradicts it is a one-line error.
    """
    if settings is None:
        return _locate(network)(**args)
    return settings.network(network, args)


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


def with_weights(overrides, path, load_pretrain, part: str) -> dict:
    """A sub-bundle's overrides for the pipeline: its ``ckpt_path`` and ``load_pretrain`` set from the pipeline's ids.

    The sub-bundle then reads the settings its checkpoint carries, as it does when run on its own. Setting
    them inside ``<part>_overrides`` is refused: the pipeline's ``<part>_ckpt`` is the one place.
    """
    overrides = dict(overrides or {})
    for key in ("ckpt_path", "load_pretrain"):
        if key in overrides:
            raise Flare23Error(f"{part}_overrides: {key} is set by the pipeline; use --{part}_ckpt / --load_pretrain instead")
    return {**overrides, "ckpt_path": str(path or ""), "load_pretrain": load_pretrain}
