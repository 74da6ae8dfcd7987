"""The quickstart's plan: sizes, budgets, the settings that differ from the method and why, hardware facts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path

import numpy as np

from flare23.errors import Flare23Error

BUNDLES = ("roi_extractor", "organ_seg", "tumor_seg")
#: The fine bundles and their ``flare23 crop --model`` (each trains on its own crop folder ``data/flare23_<model>``).
FINE_MODELS = {"organ_seg": "organ", "tumor_seg": "tumor"}
#: Share of the training time of each bundle (the time guard's allotment).
TRAIN_SHARES = {"roi_extractor": 0.15, "organ_seg": 0.6, "tumor_seg": 0.25}
#: Augmentation probabilities set to 0: minutes of training gain nothing from them, they cost CPU
#: (elastic deformation above all), and left-right mirroring swaps the lateral organs' labels.
NO_AUGMENTATION = {
    "roi_extractor": ("prob_flip", "prob_affine", "prob_brightness", "prob_gamma"),
    "fine": ("prob_rotation", "prob_scaling", "prob_elastic", "prob_brightness", "prob_gamma", "prob_flip"),
}
#: The fine models' Dice in the public code's per-class form (``dice_mode``), which learns small classes sooner.
FINE_LOSS = {"dice_mode": "per_class"}
QUICKSTART_DIFFERENCES = (
    "optimiser Adam, lr 3e-3 with the poly decay, instead of SGD nesterov (momentum 0.95, lr 0.01): SGD from scratch labels "
    "no organ within the few hundred iterations that minutes of CPU allow",
    "fine models: per-class batch Dice (dice_mode per_class, the public code's form) instead of eq. 2's single ratio",
    "fine models: batch 1 instead of 2 (more, cheaper steps learn faster per CPU second)",
    "no data augmentation (probabilities 0)",
    "small networks, coarse spacing and small patches (see Settings); validation once, at the end of each training",
)


#: Training settings of the quickstart that differ from the method (METHOD.md), for every bundle, with
#: the reason. Measured on small phantoms (organ model, 4 x 4 x 5 mm, patch 64 x 64 x 32, no
#: augmentation, validation organ DSC): 80 iterations of batch 2 with SGD (lr 0.01 or 0.1, momentum
#: 0.95) gave 0.00 (every voxel background), with Adam lr 3e-3 0.08 (liver 0.8), lr 1e-2 0.11; 160
#: iterations of batch 1 with Adam lr 3e-3, for a third more CPU time, 0.22 (liver 0.83, kidneys
#: 0.74 / 0.51, stomach 0.73). A few hundred iterations are all a CPU affords in minutes.
FAST_TRAINING: dict = {
    "learning_rate": 3e-3,
    "optimizer": {
        "_target_": "torch.optim.Adam",
        "params": "$@network.parameters()",
        "lr": "@learning_rate",
        "weight_decay": "@weight_decay",
    },
}


def _fast(bundle: str, **train) -> dict:
    """Training overrides of one bundle: ``FAST_TRAINING``, no augmentation, the fine models' Dice, then ``train``."""
    kind = "roi_extractor" if bundle == "roi_extractor" else "fine"
    out = {**FAST_TRAINING, **{k: 0.0 for k in NO_AUGMENTATION[kind]}}
    if kind == "fine":
        out.update(FINE_LOSS)
    out.update(train)
    return out


#: The fine models' network and geometry in the ``small`` preset (both models alike).
_SMALL_FINE_NETWORK = {
    "network_def#filters": [8, 16, 32, 64, 64, 64],
    "target_spacing": [4.0, 4.0, 5.0],
    "patch_size": [64, 64, 32],
}


#: Settings per phantom size. ``cases``: training pool (split into training and validation by the
#: datalist tool); ``test_cases``: held-out cases. Per bundle: ``network`` overrides go to its
#: train.json and, inside the pipeline, to its inference.json; ``train`` overrides to train.json only.
PRESETS: dict[str, dict] = {
    "small": {
        "cases": 20,
        "test_cases": 3,
        "validation_fraction": 0.2,
        "crop_margin_mm": None,  # flare23 crop default: the largest training context
        "roi_extractor": {
            "network": {"network_def#filters": [8, 16, 32, 64, 64]},
            "train": _fast("roi_extractor", patch_size=[32, 32, 32], max_epochs=10, epoch_length=10, batch_size=2),
        },
        "organ_seg": {
            "network": dict(_SMALL_FINE_NETWORK),
            "train": _fast("organ_seg", max_epochs=35, epoch_length=10, batch_size=1, sw_batch_size=1),
        },
        "tumor_seg": {
            "network": dict(_SMALL_FINE_NETWORK),
            "train": _fast("tumor_seg", max_epochs=12, epoch_length=10, batch_size=1, sw_batch_size=1),
        },
    },
    "tiny": {
        "cases": 6,
        "test_cases": 1,
        "validation_fraction": 0.2,
        "crop_margin_mm": None,  # flare23 crop default: the largest training context
        "roi_extractor": {
            "network": {"network_def#filters": [4, 8, 8, 8, 8]},
            "train": _fast("roi_extractor", patch_size=[32, 32, 32], max_epochs=2, epoch_length=2, batch_size=2),
        },
        "organ_seg": {
            "network": {"network_def#filters": [4, 8, 8, 8, 8, 8], "target_spacing": [5.0, 5.0, 8.0], "patch_size": [64, 64, 16]},
            "train": _fast("organ_seg", max_epochs=2, epoch_length=2, batch_size=2, sw_batch_size=1),
        },
        "tumor_seg": {
            "network": {"network_def#filters": [4, 8, 8, 8, 8, 8], "target_spacing": [5.0, 5.0, 8.0], "patch_size": [64, 64, 8]},
            "train": _fast("tumor_seg", max_epochs=2, epoch_length=2, batch_size=2, sw_batch_size=1),
        },
    },
}


def _hardware(device) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "CPU": cpu,
        "logical CPUs": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "device": str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(ImportError):
        import monai

        info["monai"] = monai.__version__
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory"] = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    with contextlib.suppress(OSError, AttributeError):
        info["load average at start (1 min)"] = f"{os.getloadavg()[0]:.2f}"
    return info


def default_threads(torch_default: int) -> int:
    """torch's thread count, lowered to the CPUs that other processes leave idle (1-minute load average).

    On a busy machine, OpenMP threads that wait for each other while the OS runs other processes are
    several times slower than one thread (measured on 2 cores at load 5: 23 s against 5 s per
    training iteration), so the quickstart only uses the cores that are free when it starts.
    """
    from flare23.efficiency import available_cpus

    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on Windows
        return torch_default
    free = available_cpus() - load  # the CPUs this process may use (affinity, cgroup quota), not the machine's
    return max(1, min(int(torch_default), int(free + 0.5)))


def _check_positive_int(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise Flare23Error(f"{name} {value!r}: expected a positive integer")
    return int(value)


def _plan(size: str, cases, test_cases, epochs, epoch_length) -> dict:
    import copy

    if size not in PRESETS:
        raise Flare23Error(f"size {size!r}: expected one of {', '.join(PRESETS)}")
    plan = copy.deepcopy(PRESETS[size])
    plan["size"] = size
    cases = _check_positive_int("cases", cases)
    test_cases = _check_positive_int("test_cases", test_cases)
    if cases is not None:
        if cases < 2:
            raise Flare23Error(f"cases {cases}: at least 2 are needed (training and validation)")
        plan["cases"] = cases
    if test_cases is not None:
        plan["test_cases"] = test_cases
    for bundle in BUNDLES:
        train = plan[bundle]["train"]
        if epochs is not None:
            train["max_epochs"] = _check_positive_int("epochs", epochs)
        if epoch_length is not None:
            train["epoch_length"] = _check_positive_int("epoch_length", epoch_length)
    return plan


def _settings_table(plan, seed, minutes_budget, threads, workers, device, root) -> dict:
    table = {
        "phantom size": plan["size"],
        "training pool (train + validation)": plan["cases"],
        "held-out cases": plan["test_cases"],
        "validation fraction": plan["validation_fraction"],
        "seed": seed,
        "minutes budget": minutes_budget,
        "torch threads": threads if threads is not None else "default (torch's, lowered to the idle cores)",
        "workers": workers,
        "device": device or "default (CUDA if present, else CPU)",
        "bundles": str(root),
    }
    for bundle in BUNDLES:
        table[f"{bundle} overrides"] = json.dumps({**plan[bundle]["network"], **plan[bundle]["train"]})
    return table
