"""Fast checks of bench/bench_training.py and bench/_nnunet_train.py (the pure parts; nnU-Net's side where its environment exists)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _nnunet_side as nn_side  # noqa: E402
import _nnunet_train as nn_train  # noqa: E402
import bench_training as bt  # noqa: E402

from flare23.constants import LABEL_KEYS, ORGAN_IDS, TUMOR_ID, TUMOR_STRIDES_XYZ  # noqa: E402

NNUNET_PY = ROOT / "bench" / ".venv-nnunet" / "bin" / "python"
needs_nnunet = pytest.mark.skipif(not NNUNET_PY.is_file(), reason="nnU-Net's environment missing (bash bench/nnunet_env.sh)")


def _simulate(rule, budget, seconds, max_epochs=100):
    """Run epochs of ``seconds(epoch)`` on a simulated clock; ``rule`` decides (num_epochs, stop) after each."""
    t0 = now = 0.0
    t_first = None
    last_end = t0
    n, done, epoch = max_epochs, 0, 0
    while epoch < n:
        epoch += 1
        now += seconds(epoch)
        done += 1
        last, last_end = now - last_end, now
        if done == 1:
            t_first = now
        n, stop = rule(epoch, done, t0, t_first, last, now, budget, n)
        if stop:
            break
    return epoch, n, now


def test_nnunet_budget_rule_is_our_time_budget_rule():
    """The nnU-Net trainer's epoch fitting gives the same epochs as our TimeBudget handler on the same clock."""
    import torch
    from ignite.engine import Engine, Events

    from flare23.training.resume import TimeBudget

    def time_budget_epochs(budget, secs):
        clock = [0.0]
        net = torch.nn.Linear(1, 1)
        sched = torch.optim.lr_scheduler.PolynomialLR(torch.optim.SGD(net.parameters(), lr=0.1), total_iters=40)
        engine = Engine(lambda e, _: None)
        # the clock advances before TimeBudget reads it: the tick is registered first
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: clock.__setitem__(0, clock[0] + secs(e.state.epoch)))
        TimeBudget(budget, lr_scheduler=sched, clock=lambda: clock[0]).attach(engine)
        engine.run(range(1), max_epochs=40)
        return engine.state.epoch, engine.state.max_epochs

    for budget, secs in ((100.0, lambda e: 15.0 if e == 1 else 10.0), (100.0, lambda e: 5.0 if e <= 2 else 15.0),
                         (100.0, lambda e: 10.0 if e <= 3 else 30.0), (10_000.0, lambda e: 10.0)):  # fmt: skip
        epoch, n, _ = _simulate(nn_train.fit_epochs, budget, secs, max_epochs=40)
        assert (epoch, n) == time_budget_epochs(budget, secs), (budget, epoch, n)


def test_fit_epochs_fits_the_budget():
    # epoch 1: 15 s (warm-up), then 10 s: after epoch 2, 75 s left -> 7 more epochs = 9
    epoch, n, elapsed = _simulate(nn_train.fit_epochs, 100.0, lambda e: 15.0 if e == 1 else 10.0)
    assert (epoch, n) == (9, 9) and elapsed == pytest.approx(95.0)
    # slowing down after calibration stops at an epoch end, at most one epoch late
    epoch, n, elapsed = _simulate(nn_train.fit_epochs, 100.0, lambda e: 10.0 if e <= 3 else 30.0)
    assert n == 10 and epoch < 10 and elapsed <= 130.0  # fitted after epochs 2 and 3: 10 epochs of 10 s


def test_plans_take_the_training_settings():
    fp = {"clip_low": -900.0, "clip_high": 250.0, "mean": 40.0, "std": 120.0}
    plans = nn_side.nnunet_plans([8, 16, 32, 64, 64, 64], spacing_zyx=[4.0, 2.75, 2.75], patch_zyx=[32, 64, 64],
                                 strides_xyz=TUMOR_STRIDES_XYZ, fingerprint=fp, batch_size=3)  # fmt: skip
    c = plans["configurations"]["3d_fullres"]
    assert c["spacing"] == [4.0, 2.75, 2.75] and c["patch_size"] == [32, 64, 64] and c["batch_size"] == 3
    assert c["architecture"]["arch_kwargs"]["strides"] == [list(reversed(s)) for s in TUMOR_STRIDES_XYZ]
    assert c["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64, 64, 64]
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    assert (props["percentile_00_5"], props["percentile_99_5"], props["mean"], props["std"]) == (-900.0, 250.0, 40.0, 120.0)
    # every patch axis is divisible by the network's total stride along it (nnU-Net requires it)
    for axis in range(3):
        total = 1
        for s in c["architecture"]["arch_kwargs"]["strides"]:
            total *= s[axis]
        assert c["patch_size"][axis] % total == 0
    # the defaults stay the organ model's (bench_compare)
    assert nn_side.nnunet_plans([4, 8, 16, 16, 16, 16]) == nn_side.nnunet_plans([4, 8, 16, 16, 16, 16], strides_xyz=None)


def test_count_iterations_reads_statshandler_lines():
    log = "\n".join(
        [f"2026-01-01 - INFO - Epoch: {e}/1000, Iter: {i}/50 -- train_loss: 0.5 " for e in (1, 2) for i in range(1, 51)]
        + ["flare23.training.resume - INFO - time budget 2400 s: 90.0 s per epoch, 2200 s left after epoch 2: max_epochs set to 26",
           "Epoch: 3/26, Iter: 1/50 -- train_loss: 0.4", "Epoch [3/26]: [1/50] progress bar, no loss"]
    )  # fmt: skip
    assert bt.count_iterations(log) == {"iterations": 101, "epochs": 3, "fitted_epochs": 26}


def _fake_result():
    per_class = {LABEL_KEYS[i]: {"dsc": 0.5 + i / 100, "nsd": 0.6} for i in (*ORGAN_IDS, TUMOR_ID)}

    def system(label, its, dsc):
        return {"label": label, "training": {"cpu_s": 2400.0, "iterations": its, "patches": 2 * its, "patches_per_s": 2 * its / 2400, "epochs": its // 50},
                "scores": {"organ_dsc": dsc, "organ_nsd": 0.7, "tumor_dsc": 0.2, "tumor_nsd": 0.25, "per_class": per_class},
                "lesion_counts": {"lesions": 10, "detected": 4, "fp_components": 3}}  # fmt: skip

    return {
        "settings": {
            "model": "tumor",
            "budget_min": 40.0,
            "threads": 1,
            "filters": "8,16,32,64,64,64",
            "spacing": "2.75,2.75,4.0",
            "patch": "64,64,32",
            "batch_size": 2,
            "train_cases": 50,
            "val_cases": 5,
            "heldout_cases": 12,
        },  # fmt: skip
        "hardware": "CPU, 2 cores",
        "systems": {"ours": system("ours", 1000, 0.8), "nnunet": system("nnU-Net", 1500, 0.7)},
    }


def test_markdown_table_rows():
    md = bt.markdown(_fake_result())
    assert "| ours | 40.0 | 1000 | 2000 | 0.83 | 20 | 0.800 | 0.700 | 0.200 | 0.250 | 4 / 10 | 3 |" in md
    assert "| nnU-Net | 40.0 | 1500 | 3000 | 1.25 | 30 | 0.700 |" in md
    assert "budget 40 min of wall clock per system, 1 thread(s) each" in md and "12 held-out crops" in md  # no clock: wall
    cpu = _fake_result()
    cpu["settings"]["clock"] = "cpu"
    assert "budget 40 min of CPU time per system" in bt.markdown(cpu)
    missing = _fake_result()
    missing["systems"]["ours"]["training"].pop("cpu_s")
    assert "| ours | - | 1000 | 2000 | - |" in bt.markdown(missing)  # no CPU time: said, never 0
    assert f"| tumor | {0.5 + TUMOR_ID / 100:.3f} | {0.5 + TUMOR_ID / 100:.3f} |" in md


def test_lesion_counts_and_scores_read_evaluate_outputs(tmp_path):
    (tmp_path / "lesions.csv").write_text(
        "case,lesion,voxels,volume_ml,host,detected,dsc\na,1,10,0.1,liver,1,0.5\na,2,5,0.05,liver,0,0.0\na,fp1,3,0.03,,,\n"
    )
    assert bt.lesion_counts(tmp_path) == {"lesions": 2, "detected": 1, "fp_components": 1}
    summary = {"organ_dsc": 0.8, "organ_nsd": 0.9, "tumor_dsc": 0.3, "tumor_nsd": 0.4, "n_cases": 1,
               "per_class": {"liver": {"dsc": 0.9, "nsd": 0.95, "n": 1}}, "lesions": {"fp_components_total": 1}}  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    s = bt.scores(tmp_path)
    assert s["per_class"] == {"liver": {"dsc": 0.9, "nsd": 0.95}} and s["lesions"] == {"fp_components_total": 1}


def test_bad_systems_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_training.py"), "--model", "organ", "--train_data", str(tmp_path),
                        "--heldout_data", str(tmp_path), "--work", str(tmp_path / "w"), "--systems", "ours,monai"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode != 0 and "--systems 'ours,monai'" in r.stderr


@needs_nnunet
def test_nnunet_trainer_keeps_its_defaults():
    """Only the epoch length, validation iterations and the fitted horizon differ from nnUNetTrainer."""
    code = (
        "import sys; sys.path.insert(0, 'bench'); import _nnunet_train as t; cls = t._trainer_class(); "
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as N; "
        "print(cls.__name__, issubclass(cls, N), [m for m in ('train_step', 'run_training', '__init__') if m in cls.__dict__], "
        "sorted(k for k in cls.__dict__ if not k.startswith('__') and k not in ('train_step', 'run_training')))"
    )
    r = subprocess.run([str(NNUNET_PY), "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "nnUNetTrainer True ['train_step', 'run_training', '__init__'] ['budget_s', 'clock', 'epoch_length']"


def test_render_rebuilds_the_table_from_result_json(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps(_fake_result()))
    bt.main(["--render", str(tmp_path)])
    assert (tmp_path / "result.md").read_text() == bt.markdown(_fake_result())


@needs_nnunet
def test_nnunet_cpu_clock_is_process_time(tmp_path):
    """``--clock cpu`` gives nnU-Net's budget the same clock as ours (``TimeBudget(clock="cpu")``)."""
    code = (
        "import sys, time; sys.path.insert(0, 'bench'); import _nnunet_train as t; "
        "print(t.CLOCKS['cpu'] is time.process_time, t.CLOCKS['wall'] is time.monotonic)"
    )
    r = subprocess.run([str(NNUNET_PY), "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True True"
    from flare23.training.resume import TimeBudget

    assert TimeBudget.CLOCKS["cpu"] is time.process_time


def test_our_training_command_passes_the_budget_clock():
    from types import SimpleNamespace

    args = SimpleNamespace(model="organ", spacing="2.75,2.75,4.0", patch="64,64,32", filters="8,16,32,64,64,64", budget_min=40.0,
                           clock="cpu", epoch_length=50, batch_size=2, val_interval=5)  # fmt: skip
    cmd = bt.ours_train_cmd(args, {"train": Path("t"), "fingerprint": Path("f.json")}, Path("c"), Path("o"))
    assert cmd[cmd.index("--time_budget_clock") + 1] == "cpu" and cmd[cmd.index("--time_budget_s") + 1] == "2400.0"
