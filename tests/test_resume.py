"""Interrupted training resumes where it stopped; checkpoints survive a kill during a save (issue 9, item 3).

* ``test_killed_training_resumes_...``: a tiny roi_extractor training through ``python -m monai.bundle run
  training`` (4 epochs x 6 iterations, a checkpoint every epoch) is killed with SIGKILL in the middle of
  epoch 3, then the same command runs again. A probe module (written below into ``tmp_path``, added
  through the ``run`` override) records every iteration's loss and learning rate and dumps the model
  and optimiser state at the first iteration of each process.
* The other tests use a tiny ignite engine in this process, or in a forked child that kills itself
  in the middle of ``torch.save``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

from flare23 import constants as C
from flare23.errors import Flare23Error
from flare23.training.checkpoints import CorruptCheckpointError, interrupted_saves, list_checkpoints, torch_load_safe
from flare23.training.resume import ResumeFromLast
from flare23.training.savers import SafeCheckpointSaver

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "roi_extractor" / "configs"
EPOCHS, ITERS = 4, 6
KILL_AFTER = 2 * ITERS + 2  # SIGKILL while iteration 2 of epoch 3 sleeps

PROBE = """
import json, os, time
import torch
from ignite.engine import Events


def attach(trainer, optimizer, network, out_dir):
    pause = float(os.environ.get("RESUME_TEST_PAUSE", "0"))  # only the run that the test kills is slowed down
    first = []

    def on_started(engine):
        if not first:
            first.append(engine.state.iteration)
            state = {"optimizer": optimizer.state_dict(), "model": network.state_dict(),
                     "epoch": engine.state.epoch, "iteration": engine.state.iteration}
            torch.save(state, os.path.join(out_dir, f"first_{os.getpid()}.pt"))

    def on_completed(engine):
        rec = {"pid": os.getpid(), "epoch": engine.state.epoch, "iteration": engine.state.iteration,
               "loss": float(engine.state.output[0]["loss"]), "lr": optimizer.param_groups[0]["lr"]}
        with open(os.path.join(out_dir, "iterations.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\\n")
        if engine.state.epoch >= 3:
            time.sleep(pause)

    trainer.add_event_handler(Events.ITERATION_STARTED, on_started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, on_completed)
"""


def poly_lr(epoch: int, max_epochs: int) -> float:
    """The learning rate used during 1-based ``epoch``: poly decay stepped at the end of every epoch."""
    return C.LEARNING_RATE * (1 - (epoch - 1) / max_epochs) ** C.POLY_POWER


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def tensors_equal(a, b) -> bool:
    """Deep equality of nested dicts / lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


# --- the bundle training, killed and resumed ----------------------------------------------------------------------------


def test_killed_training_resumes_with_counters_optimizer_lr_and_loss_curve(tiny_phantoms, tmp_path):
    work, ckpt = tmp_path, tmp_path / "models"
    (work / "resume_probe.py").write_text(PROBE)
    run = [
        "$import resume_probe",
        f"$resume_probe.attach(@train#trainer, @optimizer, @network, {str(work)!r})",
        "$[h.attach(@train#trainer) for h in @train#checkpoint_handlers]",
        "$@train#trainer.run()",
    ]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.json"),
           "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
           "--dataset_dir", str(tiny_phantoms), "--ckpt_dir", str(ckpt), "--output_dir", str(work / "runs"),
           "--max_epochs", str(EPOCHS), "--epoch_length", str(ITERS), "--val_interval", "2", "--num_workers", "0",
           "--patch_size", "[32,32,16]", "--network_def#filters", "[4,8,8,8,8]", "--run", json.dumps(run)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(work), env.get("PYTHONPATH", "")])
    records = work / "iterations.jsonl"

    # 1. the first run, killed mid-epoch 3 (its epoch-3 iterations sleep, so the kill lands there)
    with open(work / "run1.log", "w") as log1:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env, RESUME_TEST_PAUSE="1.0"), stdout=log1, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 400
        while len(read_records(records)) < KILL_AFTER:
            assert proc.poll() is None, (work / "run1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run did not reach epoch 3"
            time.sleep(0.05)
        assert proc.poll() is None  # still running, in the middle of epoch 3
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    log1_text = (work / "run1.log").read_text()
    assert f"Epoch: 3/{EPOCHS}, Iter: 2/{ITERS}" in log1_text and f"Epoch: 3/{EPOCHS}, Iter: 3/{ITERS}" not in log1_text
    run1 = read_records(records)
    assert [r["iteration"] for r in run1] == list(range(1, KILL_AFTER + 1))

    # the checkpoint of epoch 2 is complete and loads with weights_only=True; epoch 3 was never written
    assert [p.name for p in list_checkpoints(ckpt)] == ["checkpoint_epoch=2.pt"] and not interrupted_saves(ckpt)
    ckpt2 = torch.load(ckpt / "checkpoint_epoch=2.pt", weights_only=True)
    assert set(ckpt2) == {"model", "optimizer", "lr_scheduler", "trainer", "best_model", "settings"}
    assert ckpt2["trainer"]["iteration"] == 2 * ITERS and ckpt2["trainer"]["epoch_length"] == ITERS
    assert ckpt2["lr_scheduler"]["last_epoch"] == 2
    assert len(ckpt2["optimizer"]["state"]) > 0 and all("momentum_buffer" in s for s in ckpt2["optimizer"]["state"].values())
    best_before = (ckpt / "model.pt").read_bytes()
    [(best_score, _)] = ckpt2["best_model"]["_saved"]  # validation ran at epoch 2: (its score, ignite's name for model.pt)

    # 2. the same command again
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    log2 = proc.stdout
    assert proc.returncode == 0, log2[-4000:]
    assert f"resumed from {ckpt / 'checkpoint_epoch=2.pt'} at epoch 2, iteration {2 * ITERS}" in log2
    assert f"Epoch: 1/{EPOCHS}" not in log2 and f"Epoch: 3/{EPOCHS}, Iter: 1/{ITERS}" in log2
    run2 = read_records(records)[len(run1) :]
    assert len({r["pid"] for r in run2}) == 1 and run2[0]["pid"] != run1[0]["pid"]
    # resumed at epoch 3, iteration 0 of that epoch: iterations 13..24, two epochs
    assert [r["iteration"] for r in run2] == list(range(2 * ITERS + 1, EPOCHS * ITERS + 1))
    assert [r["epoch"] for r in run2] == [3] * ITERS + [4] * ITERS

    # the final checkpoint: epoch 4, iteration 4 x 6; n_saved=1 also retired the file of the killed run
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint_epoch=4.pt", "model.pt"]
    final = torch.load(ckpt / "checkpoint_epoch=4.pt", weights_only=True)
    assert final["trainer"]["iteration"] == EPOCHS * ITERS and final["trainer"]["epoch_length"] == ITERS
    assert final["trainer"]["iteration"] // final["trainer"]["epoch_length"] == EPOCHS
    assert final["lr_scheduler"]["last_epoch"] == EPOCHS

    # model and optimiser state (momentum buffers) at the first resumed iteration are the checkpoint's
    first = {}
    for path in work.glob("first_*.pt"):
        state = torch.load(path, weights_only=True)
        first[state["iteration"]] = state
    assert sorted(first) == [1, 2 * ITERS + 1]
    resumed, fresh = first[2 * ITERS + 1], first[1]
    assert resumed["epoch"] == 3
    assert tensors_equal(resumed["model"], ckpt2["model"])
    assert tensors_equal(resumed["optimizer"]["state"], ckpt2["optimizer"]["state"])
    assert fresh["optimizer"]["state"] == {}  # a re-initialised optimiser would have no momentum at all
    assert not tensors_equal(fresh["model"], ckpt2["model"])

    # the lr schedule continues: every iteration used the poly lr of its epoch, before and after the kill
    for r in run1 + run2:
        assert r["lr"] == pytest.approx(poly_lr(r["epoch"], EPOCHS), rel=1e-6), r

    # the loss curve continues: the first resumed losses are near the last ones before the kill, far from a fresh start
    start = mean(r["loss"] for r in run1[:ITERS])  # the first epoch of a fresh run
    before = mean(r["loss"] for r in run1[2 * ITERS :])  # the epoch-3 iterations of the killed run
    after = mean(r["loss"] for r in run2[:2])  # the first two iterations after the resume
    assert start - before > 0.1, (start, before)  # the curve does go down, so the comparison means something
    assert abs(after - before) < 0.4 * (start - before), (start, before, after)

    # the best-model tracking survived: epoch 4's validation replaces model.pt only if it beats epoch 2's score
    score4 = float(log2.split("Epoch[4] Metrics -- val_roi_dice: ")[1].split()[0])  # logged with 4 decimals
    [(best_final, _)] = final["best_model"]["_saved"]
    assert best_final == pytest.approx(max(best_score, score4), abs=1e-4)
    assert ((ckpt / "model.pt").read_bytes() == best_before) == (best_final == best_score)
    # and the resumed evaluator knows it: its log names the best score and the epoch that model.pt holds
    value, epoch = log2.rsplit("Key metric: val_roi_dice best value: ", 1)[1].split("\n")[0].split(" at epoch: ")
    assert float(value) == pytest.approx(best_final, abs=1e-4)
    assert int(epoch) == (2 if best_final == best_score else 4) and final["best_model"]["best_epoch"] == int(epoch)


# --- a tiny engine in this process ------------------------------------------------------------------------------------


def tiny_training(max_epochs: int, seed: int = 0, total_iters: int | None = None, in_features: int = 3) -> SimpleNamespace:
    """An ignite engine with a linear model, SGD (nesterov, momentum) and poly decay stepped every epoch."""
    torch.manual_seed(seed)
    net = torch.nn.Linear(in_features, 2)
    opt = torch.optim.SGD(net.parameters(), lr=C.LEARNING_RATE, momentum=C.MOMENTUM, nesterov=True)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total_iters or max_epochs, power=C.POLY_POWER)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(4, in_features, generator=gen) for _ in range(3)]

    def step(engine, x):
        opt.zero_grad()
        loss = (net(x) - 1).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    engine = Engine(step)
    lrs: dict[int, float] = {}
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: lrs.__setitem__(e.state.epoch, opt.param_groups[0]["lr"]))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: sched.step())
    objs = {"model": net, "optimizer": opt, "lr_scheduler": sched, "trainer": engine}
    return SimpleNamespace(net=net, opt=opt, sched=sched, engine=engine, data=data, lrs=lrs, objs=objs, max_epochs=max_epochs)


def saver(kind: str, ckpt_dir: Path, objs: dict):
    cls = SafeCheckpointSaver if kind == "safe" else CheckpointSaver
    return cls(save_dir=str(ckpt_dir), save_dict=objs, save_interval=1, n_saved=1, epoch_level=True)


def _train_and_die_in_third_save(kind: str, ckpt_dir: str) -> None:
    """Forked child: train; in the save after epoch 3, write half of the file, then SIGKILL itself."""
    t = tiny_training(max_epochs=5)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        if t.engine.state.epoch == 3:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            half = buf.getvalue()[: len(buf.getvalue()) // 2]
            if hasattr(f, "write"):
                f.write(half)
                f.flush()
            else:
                Path(f).write_bytes(half)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = dying_save
    saver(kind, Path(ckpt_dir), t.objs).attach(t.engine)
    t.engine.run(t.data, max_epochs=t.max_epochs)


def kill_during_save(kind: str, ckpt_dir: Path) -> None:
    child = multiprocessing.get_context("fork").Process(target=_train_and_die_in_third_save, args=(kind, str(ckpt_dir)))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL


def test_kill_during_a_save_keeps_the_previous_checkpoint_and_resume_uses_it(tmp_path, caplog):
    # MONAI's saver, for comparison: it deletes epoch 2 first, then writes epoch 3 in place -> nothing to resume from
    monai_dir = tmp_path / "monai"
    kill_during_save("monai", monai_dir)
    assert sorted(p.name for p in monai_dir.iterdir()) == ["checkpoint_epoch=3.pt"]
    with pytest.raises(CorruptCheckpointError, match="incomplete or corrupt"):
        torch_load_safe(monai_dir / "checkpoint_epoch=3.pt")
    t = tiny_training(max_epochs=5)
    with pytest.raises(Flare23Error, match="no complete checkpoint to resume from"):
        ResumeFromLast(monai_dir, t.objs)(t.engine)

    # the safe saver: epoch 2 is intact, the half-written epoch 3 is a hidden temporary file
    safe_dir = tmp_path / "safe"
    kill_during_save("safe", safe_dir)
    assert [p.name for p in list_checkpoints(safe_dir)] == ["checkpoint_epoch=2.pt"]
    [tmp] = interrupted_saves(safe_dir)
    assert tmp.name.startswith(".checkpoint_epoch=3.pt.")
    expected = torch.load(safe_dir / "checkpoint_epoch=2.pt", weights_only=True)
    assert expected["trainer"]["iteration"] == 2 * 3

    # resume: the temporary file is ignored with a warning, epoch 2 is loaded, the run goes on to epoch 5
    t = tiny_training(max_epochs=5, seed=1)
    resume = ResumeFromLast(safe_dir, t.objs)
    resume.attach(t.engine)
    saved_at_start = {}
    t.engine.add_event_handler(
        Events.STARTED,
        lambda e: saved_at_start.update(epoch=e.state.epoch, model={k: v.clone() for k, v in t.net.state_dict().items()}),
    )
    saver("safe", safe_dir, t.objs).attach(t.engine)
    with caplog.at_level(logging.WARNING, logger="flare23.training"):
        t.engine.run(t.data, max_epochs=t.max_epochs)
    assert resume.loaded_from == safe_dir / "checkpoint_epoch=2.pt"
    assert saved_at_start["epoch"] == 2 and tensors_equal(saved_at_start["model"], expected["model"])
    assert any("interrupted" in r.getMessage() and tmp.name in r.getMessage() for r in caplog.records)
    assert sorted(t.lrs) == [3, 4, 5]  # only the remaining epochs ran
    # the stale temporary file and the older checkpoints are gone; n_saved=1 holds
    assert sorted(p.name for p in safe_dir.iterdir()) == ["checkpoint_epoch=5.pt"]
    assert torch.load(safe_dir / "checkpoint_epoch=5.pt", weights_only=True)["trainer"]["iteration"] == 5 * 3


def test_resume_skips_truncated_and_empty_checkpoints(tmp_path, caplog):
    t = tiny_training(max_epochs=2)
    saver("safe", tmp_path, t.objs).attach(t.engine)
    t.engine.run(t.data, max_epochs=2)
    good = (tmp_path / "checkpoint_epoch=2.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "checkpoint_epoch=4.pt").write_bytes(b"")
    (tmp_path / "checkpoint_epoch=5.pt").write_bytes(os.urandom(len(good)))
    r = tiny_training(max_epochs=6, seed=3)
    resume = ResumeFromLast(tmp_path, r.objs)
    with caplog.at_level(logging.WARNING, logger="flare23.training"):
        resume(r.engine)
    assert resume.loaded_from == tmp_path / "checkpoint_epoch=2.pt"
    skipped = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("skipping ")]
    assert [m.split(": checkpoint is incomplete or corrupt")[0] for m in skipped] == [
        f"skipping {tmp_path / f'checkpoint_epoch={n}.pt'}" for n in (5, 4, 3)
    ]
    assert tensors_equal(r.net.state_dict(), t.net.state_dict())
    assert tensors_equal(r.opt.state_dict()["state"], t.opt.state_dict()["state"])
    assert r.engine.state.epoch == 2 and r.engine.state.iteration == 6
    assert r.sched.last_epoch == 2


def test_resume_refuses_a_crafted_pickle_without_running_it(tmp_path):
    t = tiny_training(max_epochs=2)
    saver("safe", tmp_path, t.objs).attach(t.engine)
    t.engine.run(t.data, max_epochs=2)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "checkpoint_epoch=7.pt"  # newer than the good one: it is the one resume would pick
    torch.save({"model": Payload(), "optimizer": {}, "lr_scheduler": {}, "trainer": {}}, str(evil))
    r = tiny_training(max_epochs=9, seed=5)
    before = {k: v.clone() for k, v in r.net.state_dict().items()}
    with pytest.raises(Flare23Error, match=r"checkpoint_epoch=7\.pt: refused to load checkpoint .*posix\.system"):
        ResumeFromLast(tmp_path, r.objs)(r.engine)
    assert not marker.exists()
    assert tensors_equal(r.net.state_dict(), before)  # nothing was loaded, not even from the good file


def test_resume_refuses_a_checkpoint_of_another_network_before_loading_anything(tmp_path):
    t = tiny_training(max_epochs=2, in_features=5)
    saver("safe", tmp_path, t.objs).attach(t.engine)
    t.engine.run(t.data, max_epochs=2)
    r = tiny_training(max_epochs=4, seed=2)  # Linear(3, 2): weight shape differs
    before = r.opt.state_dict()
    with pytest.raises(Flare23Error, match=r"checkpoint_epoch=2\.pt \[model\]: checkpoint shapes do not match the network"):
        ResumeFromLast(tmp_path, r.objs)(r.engine)
    assert r.sched.last_epoch == 0 and r.opt.state_dict() == before
    # a checkpoint without the trainer counters cannot be resumed from; an optional entry may be absent
    torch.save({"model": r.net.state_dict()}, tmp_path / "checkpoint_epoch=3.pt")
    with pytest.raises(Flare23Error, match=r"cannot resume, checkpoint lacks \['optimizer', 'lr_scheduler', 'trainer'\]"):
        ResumeFromLast(tmp_path, r.objs)(r.engine)
    (tmp_path / "checkpoint_epoch=3.pt").unlink()
    u = tiny_training(max_epochs=4, in_features=5)
    extra = SafeCheckpointSaver(save_dir=str(tmp_path / "best"), save_dict={"model": u.net}, save_key_metric=True)
    resume = ResumeFromLast(tmp_path, {**u.objs, "best_model": extra}, optional_keys=["best_model"])
    resume(u.engine)
    assert resume.loaded_from == tmp_path / "checkpoint_epoch=2.pt" and u.engine.state.epoch == 2


def scripted_evaluator(scores: list[float], save_dir: Path):
    """MONAI's SupervisedEvaluator whose key metric returns ``scores`` in turn, with a best-model saver."""
    from ignite.metrics import Metric
    from monai.engines import SupervisedEvaluator

    values = iter(scores)

    class Scripted(Metric):
        def reset(self):
            pass

        def update(self, output):
            pass

        def compute(self):
            return next(values)

    net = torch.nn.Conv1d(1, 1, 1)
    best = SafeCheckpointSaver(
        save_dir=str(save_dir), save_dict={"model": net}, save_key_metric=True, key_metric_filename="model.pt"
    )
    batch = [{"image": torch.zeros(1, 1, 4), "label": torch.zeros(1, 1, 4)}]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=batch, network=net, key_val_metric={"score": Scripted()}, val_handlers=[best]
    )
    return evaluator, best, net


@contextlib.contextmanager
def engine_messages(engine):
    """The messages ``engine`` logs, captured on its own logger.

    caplog is not enough here: a bundle's ``logging.conf``, loaded by an earlier test in the same
    process, disables the ignite loggers that already exist (``fileConfig`` does by default).
    """
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    log = engine.logger
    disabled, level = log.disabled, log.level
    log.disabled = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.disabled = disabled
        log.setLevel(level)


def test_resumed_best_model_tracking_reaches_the_evaluator_so_logs_and_best_epoch_stay_true(tmp_path):
    # the first process: validations at epochs 1 and 2 score 0.6 and 0.8 -> model.pt holds epoch 2's weights
    ev, best, net = scripted_evaluator([0.6, 0.8], tmp_path)
    for epoch in (1, 2):
        ev.run(global_epoch=epoch)
    torch.save({"best_model": best.state_dict()}, tmp_path / "checkpoint_epoch=2.pt")
    state = torch.load(tmp_path / "checkpoint_epoch=2.pt", weights_only=True)["best_model"]
    [(score, _)] = state["_saved"]  # (score, ignite's name for model.pt)
    assert score == pytest.approx(0.8) and state["best_epoch"] == 2
    model_e2 = (tmp_path / "model.pt").read_bytes()

    # MONAI alone, in a new process: the evaluator's own best starts afresh, so a worse 0.7 is logged as the best
    plain, _, _ = scripted_evaluator([0.7], tmp_path / "plain")
    with engine_messages(plain) as log:
        plain.run(global_epoch=3)
    assert "Got new best metric of score: 0.7" in log and plain.state.best_metric_epoch == 3

    # resumed: epoch 3 scores 0.7 (worse: model.pt and the best stay epoch 2's), epoch 4 scores 0.9 (better)
    ev, best, net = scripted_evaluator([0.7, 0.9], tmp_path)
    with torch.no_grad():
        net.weight.add_(1.0)  # the resumed weights differ from epoch 2's
    best.load_state_dict(state)
    assert (ev.state.best_metric, ev.state.best_metric_epoch) == (pytest.approx(0.8), 2)
    with engine_messages(ev) as log:
        ev.run(global_epoch=3)
    assert log and not any("Got new best metric" in m for m in log)  # it did log, just not that
    assert (ev.state.best_metric, ev.state.best_metric_epoch) == (pytest.approx(0.8), 2)
    assert (tmp_path / "model.pt").read_bytes() == model_e2
    with engine_messages(ev) as log:
        ev.run(global_epoch=4)
    assert "Got new best metric of score: 0.9" in log
    assert (ev.state.best_metric, ev.state.best_metric_epoch) == (pytest.approx(0.9), 4)
    assert (tmp_path / "model.pt").read_bytes() != model_e2
    [(score, _)] = best.state_dict()["_saved"]
    assert score == pytest.approx(0.9) and best.state_dict()["best_epoch"] == 4

    # a checkpoint written before the epoch was recorded still protects model.pt; the evaluator's best is left alone
    old, old_best, _ = scripted_evaluator([0.5], tmp_path)
    old_best.load_state_dict({"_saved": [(0.95, "model_key_metric=0.9500.pt")]})
    assert old.state.best_metric_epoch == -1
    before = (tmp_path / "model.pt").read_bytes()
    old.run(global_epoch=5)
    assert (tmp_path / "model.pt").read_bytes() == before


@pytest.mark.parametrize("old_max,new_max", [(4, 8), (4, 4)])
def test_resume_keeps_the_lr_horizon_of_the_new_max_epochs(tmp_path, caplog, old_max, new_max):
    # a run planned for old_max epochs, interrupted after 2
    t = tiny_training(max_epochs=2, total_iters=old_max)
    saver("safe", tmp_path, t.objs).attach(t.engine)
    t.engine.run(t.data, max_epochs=2)
    state = torch.load(tmp_path / "checkpoint_epoch=2.pt", weights_only=True)
    # the bug this guards against: a plain load_state_dict brings back the old horizon
    plain = tiny_training(max_epochs=new_max)
    plain.sched.load_state_dict(state["lr_scheduler"])
    assert plain.sched.total_iters == old_max

    r = tiny_training(max_epochs=new_max, seed=4)
    resume = ResumeFromLast(tmp_path, r.objs)
    resume.attach(r.engine)
    with caplog.at_level(logging.INFO, logger="flare23.training"):
        r.engine.run(r.data, max_epochs=new_max)
    assert r.sched.total_iters == new_max
    assert sorted(r.lrs) == list(range(3, new_max + 1))
    for epoch, lr in r.lrs.items():
        assert lr == pytest.approx(poly_lr(epoch, new_max), rel=1e-9), epoch
        assert lr > 0
    horizon_logs = [rec.getMessage() for rec in caplog.records if "lr schedule horizon" in rec.getMessage()]
    assert len(horizon_logs) == (old_max != new_max)
    if horizon_logs:
        assert f"had {old_max} steps, this run has {new_max}" in horizon_logs[0]
