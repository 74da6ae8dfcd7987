"""Network specifications: build a bundle's network from its arguments and compare two of them (the resume, evaluate and inference checks)."""

from __future__ import annotations

import inspect
import json
import logging
import math
from pathlib import Path

import torch

from flare23.errors import Flare23Error

logger = logging.getLogger(__name__)


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


#: DynUNet's arguments that only add training outputs (the deep-supervision heads, used by the loss alone).
HEAD_ARGS = ("deep_supervision", "deep_supr_num")

#: Classes that are another class's network (the same modules, weights and inference output) and differ
#: only in their training outputs: a checkpoint of one is the other's (resume, fine-tuning, inference).
SAME_NETWORK_AS = {"flare23.models.networks.NativeHeadsDynUNet": "monai.networks.nets.dynunet.DynUNet"}


def _canonical(spec: dict) -> dict:
    target = spec.get("_target_")
    return {**spec, "_target_": SAME_NETWORK_AS[target]} if target in SAME_NETWORK_AS else spec


def heads_as_asked(stored: dict, asked: dict) -> dict:
    """``stored`` without its deep-supervision heads when ``asked`` has none (inference), else ``stored`` unchanged.

    The fine models train with deep supervision and infer without it: the heads change neither the
    network's inference output nor any other weight (their keys are dropped by name when the weights
    load, :func:`flare23.training.checkpoints.unused_head_keys`), and a DynUNet without them can be
    scripted. So an inference network without heads is the trained network; asking for heads that the
    training did not have is not.
    """
    if stored.get("deep_supervision") is True and asked.get("deep_supervision") is False:
        return {**stored, **{k: asked[k] for k in HEAD_ARGS if k in asked}}
    return stored


def network_difference(
    stored: dict, asked: dict, class_id: str = "network_def#_target_", heads_optional: bool = False
) -> tuple[str, object, object] | None:
    """Where two network specs first differ: ``(config id, stored value, asked value)``, or ``None`` when they agree.

    ``class_id`` names the id that chooses the class (``network_def#network`` in the inference configs).
    ``heads_optional`` (inference): a network asked without the deep-supervision heads that ``stored`` was
    trained with agrees with it (:func:`heads_as_asked`); a resumed training compares them strictly.
    Classes in :data:`SAME_NETWORK_AS` agree with the class they map to.
    """
    if heads_optional:
        stored = heads_as_asked(stored, asked)
    stored, asked = _canonical(stored), _canonical(asked)
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
