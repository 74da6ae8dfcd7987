"""organ_seg and tumor_seg are one bundle with two settings: their configs differ only on allowed ids.

Every ``bundles/organ_seg/configs/*.json`` (but ``metadata.json``) is compared with its
``bundles/tumor_seg`` namesake, parsed raw with ``json`` (nothing instantiated), flattened into
MONAI ids (``a#b#0``: nested dicts and lists joined by ``#``, as ``monai.bundle`` addresses them).
An id that is in one file only, or has two values, must be in ``ALLOWED`` with the reason why.
A change made to one bundle and not the other fails here, naming the id and both values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORGAN = ROOT / "bundles" / "organ_seg" / "configs"
TUMOR = ROOT / "bundles" / "tumor_seg" / "configs"
ABSENT = "<absent>"

# The ids meant to differ (in any config file), each with why.
ALLOWED = frozenset(
    {
        "bundle_root",  # each bundle's own folder
        "model_name",  # "organ" / "tumor": selects the fingerprint entry and is recorded in the checkpoint's settings
        "dataset_dir",  # default data folders: the two models train on differently selected crops (METHOD.md section 2)
        "target_spacing",  # 2.5 x 0.82 x 0.82 vs 4.0 x 1.2 x 1.2 mm (METHOD.md section 4 table)
        "patch_size",  # 64 x 128 x 224 vs 32 x 128 x 192 (METHOD.md section 4 table)
        "overlap",  # sliding-window overlap 0.2 vs 0.5 (METHOD.md section 4 table)
        "network_def#strides",  # pools: the tumor model's last stage is [1,2,2] (METHOD.md section 4 table)
        "network_def#upsample_kernel_size",  # follows the strides
        "upweighted_classes#7",  # organ model: small organs raised (right adrenal)
        "upweighted_classes#8",  # organ model: small organs raised (left adrenal)
        "upweighted_classes#9",  # organ model: small organs raised (gallbladder)
        "upweighted_classes#10",  # organ model: small organs raised (esophagus)
        "upweighted_classes#14",  # tumor model: tumor weight 2 (METHOD.md section 4 table)
        "crop_ratios",  # patch selection: organ-centred vs tumor-centred (METHOD.md section 4)
        "crop_fallback_ratios",  # finetune: tumor-centred patches fall back to organ centres in a case without tumor
        # the key metric is the model's own target, the other one is an additional metric
        # (test_a_metric_name_has_one_definition checks that the two definitions are the same in both bundles)
        "validate#key_metric#val_mean_organ_dsc#_target_",  # organ model's key metric
        "validate#key_metric#val_mean_organ_dsc#label_ids",  # organ model's key metric
        "validate#key_metric#val_mean_organ_dsc#output_transform",  # organ model's key metric
        "validate#key_metric#val_tumor_dsc#_target_",  # tumor model's key metric
        "validate#key_metric#val_tumor_dsc#label_ids",  # tumor model's key metric
        "validate#key_metric#val_tumor_dsc#output_transform",  # tumor model's key metric
        "validate#additional_metrics#val_mean_organ_dsc#_target_",  # tumor model's additional metric
        "validate#additional_metrics#val_mean_organ_dsc#label_ids",  # tumor model's additional metric
        "validate#additional_metrics#val_mean_organ_dsc#output_transform",  # tumor model's additional metric
        "validate#additional_metrics#val_tumor_dsc#_target_",  # organ model's additional metric
        "validate#additional_metrics#val_tumor_dsc#label_ids",  # organ model's additional metric
        "validate#additional_metrics#val_tumor_dsc#output_transform",  # organ model's additional metric
    }
)


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": [1, 2]}}`` -> ``{"a#b#0": 1, "a#b#1": 2}``; empty dicts and lists are leaves."""
    if isinstance(obj, dict) and obj:
        items = obj.items()
    elif isinstance(obj, list) and obj:
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out: dict[str, object] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}#{key}" if prefix else str(key)))
    return out


def load(folder: Path, name: str) -> dict[str, object]:
    return flatten(json.loads((folder / name).read_text()))


def config_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.json") if p.name != "metadata.json")


CONFIGS = config_names(ORGAN)


def differences(name: str) -> dict[str, tuple[object, object]]:
    organ, tumor = load(ORGAN, name), load(TUMOR, name)
    return {
        k: (organ.get(k, ABSENT), tumor.get(k, ABSENT))
        for k in sorted(set(organ) | set(tumor))
        if organ.get(k, ABSENT) != tumor.get(k, ABSENT)
    }


def test_flatten_gives_monai_ids():
    nested = {"a": {"b": [1, {"c": 2}]}, "d#e": 3, "f": [], "g": {}}
    assert flatten(nested) == {"a#b#0": 1, "a#b#1#c": 2, "d#e": 3, "f": [], "g": {}}


def test_both_bundles_have_the_same_config_files():
    assert config_names(ORGAN) == config_names(TUMOR)
    expected = {"train.json", "inference.json", "evaluate.json", "finetune.json", "train_cpu.json"}
    assert expected <= set(CONFIGS) and any(n.startswith("multi_gpu_") for n in CONFIGS), CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_organ_and_tumor_configs_differ_only_on_allowed_ids(name):
    unexpected = {k: v for k, v in differences(name).items() if k not in ALLOWED}
    lines = [f"  {k}: organ_seg={a!r}, tumor_seg={b!r}" for k, (a, b) in unexpected.items()]
    assert not unexpected, f"{name}: ids that differ between organ_seg and tumor_seg and are not in ALLOWED:\n" + "\n".join(lines)


def test_allow_list_has_no_stale_entries():
    differing = set().union(*(differences(name) for name in CONFIGS))
    stale = sorted(ALLOWED - differing)
    assert not stale, f"ALLOWED ids that no longer differ in any config (remove them): {stale}"


def test_a_metric_name_has_one_definition():
    """``val_tumor_dsc`` is the same metric whether it is a key or an additional metric, in either bundle."""
    seen: dict[str, tuple[object, str]] = {}
    for folder in (ORGAN, TUMOR):
        for name in CONFIGS:
            raw = flatten(json.loads((folder / name).read_text()))
            for key, value in raw.items():
                for role in ("validate#key_metric#", "validate#additional_metrics#"):
                    if key.startswith(role):
                        metric_leaf = key[len(role) :]
                        where = f"{folder.parent.name}/{name}:{key}"
                        first = seen.setdefault(metric_leaf, (value, where))
                        assert first[0] == value, f"{metric_leaf}: {first[1]}={first[0]!r} but {where}={value!r}"
    assert {"val_mean_organ_dsc#label_ids", "val_tumor_dsc#label_ids"} <= set(seen)
