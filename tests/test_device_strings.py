"""``--device cpu`` / ``--device cuda:1`` / ``--device cuda`` work as strings in every config of every bundle (issue 21, item 7).

A command line gives ``device`` as a string, where the configs' default is a ``torch.device``: an expression
such as ``@device.type`` then fails (``'str' object has no attribute 'type'``, as organ_seg's and tumor_seg's
``train.json`` did). Every use of ``@device`` must take either form. The real runs with ``--device cpu``
(training all three bundles, the bundles' inference, the pipeline) are in ``tests/test_trained_settings.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
DEVICES = ("cpu", "cuda", "cuda:1")
#: every place a device may be used as given (torch and MONAI take a string or a torch.device there)
ALLOWED = re.compile(r"torch\.device\(@device\)|\.to\(@device\)|set_device\(@device\)|map_location=@device")


def config_sets() -> list[tuple[str, list[str]]]:
    """Every config of every bundle, alone when it is a whole config, else on top of the config it extends."""
    sets = []
    for bundle in sorted(p.name for p in BUNDLES.iterdir() if (p / "configs").is_dir()):
        files = sorted(p.name for p in (BUNDLES / bundle / "configs").glob("*.json") if p.name != "metadata.json")
        for name in files:
            if name in ("train.json", "inference.json"):
                sets.append((bundle, [name]))
            elif name.startswith("multi_gpu_evaluate") and bundle != "pipeline":
                sets.append((bundle, ["train.json", "evaluate.json", name]))
            elif name == "multi_gpu_evaluate.json":
                sets.append((bundle, ["inference.json", "evaluate.json", name]))
            elif bundle == "pipeline":
                sets.append((bundle, ["inference.json", name]))
            else:
                sets.append((bundle, ["train.json", name]))
    return sets


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_every_config_is_covered():
    names = {(b, f[-1]) for b, f in config_sets()}
    for config in BUNDLES.glob("*/configs/*.json"):
        if config.name != "metadata.json":
            assert (config.parent.parent.name, config.name) in names


@pytest.mark.parametrize("bundle, files", config_sets(), ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_every_use_of_device_takes_a_string_or_a_torch_device(bundle, files):
    import json

    for name in files:
        for text in _strings(json.loads((BUNDLES / bundle / "configs" / name).read_text())):
            if text == "@device":
                continue  # passed on whole to MONAI / torch, which take both
            rest = ALLOWED.sub("", text)
            assert "@device" not in rest, f"{bundle}/{name}: {text}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bundle, files", config_sets(), ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_device_dependent_ids_evaluate_with_a_device_string(bundle, files, device):
    """``amp`` and DDP's ``device_ids`` (what reads the device's type) evaluate with each string, as with torch.device."""
    import torch
    from monai.bundle import ConfigParser

    for given in (device, f"$torch.device({device!r})"):
        parser = ConfigParser()
        parser.read_config([str(BUNDLES / bundle / "configs" / f) for f in files])
        parser["bundle_root"] = str(BUNDLES / bundle)
        parser["device"] = given
        cuda = torch.device(device).type == "cuda"
        if "amp" in parser and "@device" in str(parser["amp"]):  # the ROI bundle trains without AMP anywhere
            assert parser.get_parsed_content("amp") is cuda
        if "network" in parser and isinstance(parser["network"], dict) and "device_ids" in parser["network"]:
            ids = parser.get_parsed_content("network#device_ids")
            assert ids == ([torch.device(device)] if cuda else None)
