"""TimeBudget: a training fitted into a wall-clock budget, poly decay complete, on a simulated clock."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine, Events

from flare23.errors import Flare23Error
from flare23.training.resume import ResumeFromLast, TimeBudget, set_horizon


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _run(budget, max_epochs=100, epoch_length=10, seconds_per_iteration=lambda epoch: 1.0, warmup=5.0, calibration=2):
    clock = FakeClock()
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=max_epochs, power=0.9)
    lrs = []

    def step(engine, _):
        opt.step()
        clock.t += seconds_per_iteration(engine.state.epoch)
        lrs.append(opt.param_groups[0]["lr"])

    engine = Engine(step)
    engine.add_event_handler(Events.EPOCH_STARTED(once=1), lambda e: setattr(clock, "t", clock.t + warmup))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: sched.step())  # as MONAI's LrScheduleHandler
    handler = TimeBudget(budget, lr_scheduler=sched, calibration_epochs=calibration, clock=clock)
    handler.attach(engine)
    start = clock.t
    engine.run(range(epoch_length), max_epochs=max_epochs)
    return engine, sched, handler, lrs, clock.t - start


def test_fits_the_epochs_and_the_poly_decay_into_the_budget():
    engine, sched, handler, lrs, elapsed = _run(budget=100.0)
    # epoch 1: 5 s warm-up + 10 s; then 10 s per epoch: after epoch 2 (25 s) 75 s are left -> 7 more epochs
    assert handler.fitted_epochs == 9 and engine.state.epoch == 9
    assert elapsed == pytest.approx(95.0) and elapsed <= 100.0
    assert sched.total_iters == 9
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the decay reached 0 at the new end
    # from epoch 3 on the lr is the closed form of a 9-epoch poly schedule
    for epoch in range(3, 10):
        assert lrs[(epoch - 1) * 10] == pytest.approx(0.01 * (1 - (epoch - 1) / 9) ** 0.9, rel=1e-6)


def test_no_budget_or_a_loose_one_leaves_the_run_alone():
    engine, sched, handler, _, _ = _run(budget=0.0, max_epochs=6)
    assert engine.state.epoch == 6 and sched.total_iters == 6 and handler.fitted_epochs is None
    engine, sched, handler, _, _ = _run(budget=10_000.0, max_epochs=6)
    assert engine.state.epoch == 6 and sched.total_iters == 6 and handler.fitted_epochs is None


def test_epochs_that_slow_down_after_calibration_stop_the_run_at_an_epoch_end():
    # 1 s per iteration for epochs 1-3, then 3 s: the fitted 9 epochs no longer fit
    engine, _, handler, _, elapsed = _run(budget=100.0, seconds_per_iteration=lambda e: 1.0 if e <= 3 else 3.0)
    assert handler.fitted_epochs == 9
    assert engine.state.epoch < 9
    assert elapsed <= 100.0 + 30.0  # at most about one (slow) epoch late
    assert engine.state.iteration % 10 == 0  # stopped at an epoch end, never mid-epoch


def test_the_last_calibration_counts():
    # epoch 2 is fast, epoch 3 slow: the second calibration lowers max_epochs again
    engine, _, handler, _, elapsed = _run(budget=100.0, seconds_per_iteration=lambda e: 0.5 if e <= 2 else 1.5, calibration=2)
    # epoch 2 alone would fit 19 epochs; epoch 3 (15 s) lowers it to 7, which fit: 30 s + 4 x 15 s
    assert handler.fitted_epochs == engine.state.epoch == 7
    assert elapsed == pytest.approx(90.0)


def test_logs_the_epochs_it_chose(caplog):
    with caplog.at_level(logging.INFO, logger="flare23.training"):
        _run(budget=100.0)
    assert any("max_epochs set to 9" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("budget", [-1, "soon", float("nan")])
def test_bad_budget_is_refused(budget):
    with pytest.raises(Flare23Error, match="time_budget_s"):
        TimeBudget(budget)


def test_set_horizon_is_the_closed_form_resume_uses():
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=50, power=0.9)
    for _ in range(4):
        opt.step()
        sched.step()
    lr = set_horizon(sched, 10)
    assert lr == pytest.approx(0.1 * (1 - 4 / 10) ** 0.9) and opt.param_groups[0]["lr"] == pytest.approx(lr)
    assert ResumeFromLast._restore_horizon  # resume shares the same helper (see tests/test_resume.py)


def _ddp_worker(local_rank, out_dir):
    """Rank 1's epochs take twice as long: both ranks must still stop at rank 0's epoch."""
    import ignite.distributed as idist

    rank = idist.get_rank()
    engine, sched, handler, _, _ = _run(budget=100.0, seconds_per_iteration=lambda e: 1.0 if rank == 0 else 2.0)
    (out_dir / f"rank{rank}.txt").write_text(f"{engine.state.epoch} {sched.total_iters}")


@pytest.mark.slow
def test_ranks_agree_under_ddp(tmp_path):
    import ignite.distributed as idist

    with idist.Parallel(backend="gloo", nproc_per_node=2, start_method="fork") as parallel:
        parallel.run(_ddp_worker, tmp_path)
    results = {p.name: p.read_text() for p in tmp_path.glob("rank*.txt")}
    assert results == {"rank0.txt": "9 9", "rank1.txt": "9 9"}  # rank 1 alone would have fitted 4


def _sleepy_run(clock, budget=0.3, max_epochs=6):
    """Epochs of 4 iterations that sleep 50 ms each: wall time passes, almost no CPU time."""
    import time

    engine = Engine(lambda e, _: time.sleep(0.05))
    handler = TimeBudget(budget, calibration_epochs=1, clock=clock)
    handler.attach(engine)
    engine.run(range(4), max_epochs=max_epochs)
    return engine, handler


def test_the_cpu_clock_counts_this_process_cpu_time_not_waiting():
    """``time_budget_clock cpu``: a training that waits (a shared machine) keeps its compute budget."""
    engine, handler = _sleepy_run("wall")  # 0.2 s per epoch against 0.3 s: cut short
    assert engine.state.epoch < 6 and handler.fitted_epochs is not None
    engine, handler = _sleepy_run("cpu")  # the sleeps cost no CPU time: the whole run fits
    assert engine.state.epoch == 6 and handler.fitted_epochs is None


@pytest.mark.parametrize("bundle", ["organ_seg", "tumor_seg", "roi_extractor"])
def test_bundles_pass_time_budget_clock_to_the_handler(bundle):
    import time
    from pathlib import Path

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundles" / bundle / "configs" / "train.json"))
    handlers = parser.get("train#handlers")
    i = next(k for k, h in enumerate(handlers) if isinstance(h, dict) and h.get("_target_", "").endswith("TimeBudget"))
    for value, clock in (("wall", time.monotonic), ("cpu", time.process_time)):
        parser["time_budget_clock"] = value
        parser["train#handlers"][i]["lr_scheduler"] = None
        handler = parser.get_parsed_content(f"train#handlers#{i}", lazy=False)
        assert handler.clock is clock
    with pytest.raises(Flare23Error, match="time_budget_clock must be one of"):
        TimeBudget(10.0, clock="gpu")
