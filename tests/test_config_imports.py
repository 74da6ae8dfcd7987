"""Every ``flare23`` module a bundle config names is imported by the config that is loaded with it.

MONAI evaluates ``_target_`` paths and ``$`` expressions against the config's ``imports``; a module
that nobody imports fails only when that one component is built (for an evaluate mixin: only when
someone evaluates). Parsed raw with ``json`` and checked against the package's files, so a renamed or
moved module fails here, naming the config and the module.

Rules (MONAI replaces top-level keys when it merges config files, so ``imports`` is never merged):
a config with ``imports`` imports every module it names; a mixin without ``imports`` names only
modules that a config with ``imports`` of its bundle imports (it is always loaded after one); a mixin with its
own ``imports`` (the pipeline's ``evaluate.json``) also keeps every import of ``inference.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.name for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
BASES = ("train.json", "inference.json")


def referenced_modules(text: str) -> set[str]:
    """The deepest existing ``flare23`` module of every dotted name in ``text``; an unknown path is an error."""
    out = set()
    for ref in re.findall(r"(?<![\w.])flare23(?:\.[A-Za-z_]\w*)+", text):
        parts = ref.split(".")
        found = None
        for i in range(len(parts), 0, -1):
            base = ROOT.joinpath(*parts[:i])
            if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
                found = ".".join(parts[:i])
                break
        assert found not in (None, "flare23"), f"{ref}: no such module"
        out.add(found)
    return out


def imports_of(config: dict) -> set[str]:
    return {s.split()[1] for s in config.get("imports", []) if s.startswith("$import flare23")}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_module_a_config_names_is_imported(bundle):
    folder = ROOT / "bundles" / bundle / "configs"
    configs = {p.name: (p.read_text(), json.loads(p.read_text())) for p in sorted(folder.glob("*.json")) if p.name != "metadata.json"}
    base_imports = set().union(*(imports_of(c) for _, c in configs.values()))
    for name, (_text, config) in configs.items():
        named = referenced_modules(json.dumps({k: v for k, v in config.items() if k != "imports"}))
        if "imports" in config:
            assert "flare23" in {s.split()[1] for s in config["imports"] if s.startswith("$import")}, f"{bundle}/{name}"
            missing = named - imports_of(config)
        else:
            missing = named - base_imports
        assert not missing, f"{bundle}/configs/{name} names {sorted(missing)} but no config loaded with it imports them"
        if "imports" in config and name not in BASES and "inference.json" in configs:
            lost = imports_of(configs["inference.json"][1]) - imports_of(config)
            assert not lost, f"{bundle}/configs/{name} replaces inference.json's imports and drops {sorted(lost)}"


def test_a_moved_module_is_caught():
    assert referenced_modules("$flare23.models.losses.class_weights(1)") == {"flare23.models.losses"}
    with pytest.raises(AssertionError, match="no such module"):
        referenced_modules("$flare23.losses_gone.class_weights(1)")
