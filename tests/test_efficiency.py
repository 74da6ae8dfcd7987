"""EfficiencyMonitor and EfficiencyLog (flare23.efficiency). No assertions on speed."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
import torch

from flare23.efficiency import EfficiencyLog, EfficiencyMonitor, process_rss_mb
from flare23.errors import Flare23Error

BLOCK_MB = 200


def _rss_from_status_mb() -> float:
    """Independent reading: VmRSS of /proc/self/status (kB)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS")


def test_process_rss_agrees_with_proc_status():
    assert process_rss_mb() == pytest.approx(_rss_from_status_mb(), abs=2.0)


def test_cpu_monitor_sees_a_known_allocation():
    block = None
    outer = time.perf_counter()
    with EfficiencyMonitor(device="cpu", interval=0.05) as mon:
        t_start = time.perf_counter()
        block = np.ones(BLOCK_MB * 1024 * 1024 // 8)  # touched: resident
        t_allocated = time.perf_counter()
        time.sleep(0.4)
        assert block.sum() > 0
        del block
        t_freed = time.perf_counter()
        time.sleep(0.2)
    outer = time.perf_counter() - outer
    assert mon.memory_kind == "rss" and mon.peak_torch_mb is None
    baseline = mon.samples[0]
    assert 0.85 * BLOCK_MB < mon.peak_mb - baseline < 1.25 * BLOCK_MB
    assert mon.peak_mb == max(mon.samples)
    assert mon.samples[-1] - baseline < 0.5 * BLOCK_MB  # freed before the end
    # wall time is the block's; samples at entry, every interval, and at exit
    assert 0.6 <= mon.wall_s <= outer and outer - mon.wall_s < 0.2
    expected_n = int(mon.wall_s / mon.interval) + 2
    assert abs(len(mon.samples) - expected_n) <= 2
    assert mon.auc_mb_s == pytest.approx(sum(mon.samples) * 0.05, rel=1e-12)
    # the allocation adds about BLOCK_MB x (time it was held) to the area
    extra = mon.auc_mb_s - baseline * len(mon.samples) * 0.05
    assert 0.8 * BLOCK_MB * (t_freed - t_allocated - 0.1) < extra < 1.25 * BLOCK_MB * (t_freed - t_start + 0.1)


def test_monitor_reusable_and_errors():
    mon = EfficiencyMonitor(device="cpu", interval=0.1)
    with pytest.raises(Flare23Error, match="no measurement"):
        mon.as_row("x")
    for _ in range(2):
        with mon:
            pass
        assert len(mon.samples) == 2 and mon.wall_s < 0.1
    with pytest.raises(Flare23Error, match="interval"):
        EfficiencyMonitor(device="cpu", interval=0)
    with pytest.raises(Flare23Error, match="device"):
        EfficiencyMonitor(device="tpu")
    with pytest.raises(ValueError):
        with EfficiencyMonitor(device="cpu") as m2:
            raise ValueError("inside")
    assert m2.wall_s is not None  # measured even when the block fails


def test_efficiency_log_rows_and_atomic_rewrite(tmp_path):
    path = tmp_path / "logs" / "efficiency.csv"
    log = EfficiencyLog(path)
    with log.measure("case_0001", device="cpu", interval=0.02) as mon1:
        time.sleep(0.05)
    mon2 = EfficiencyMonitor(device="cpu", interval=0.02)
    with mon2:
        time.sleep(0.03)
    log.add("case_0002", mon2)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", "wall_s", "peak_rss_mb", "peak_torch_mb", "auc_mb_s"]
    assert [r["case"] for r in rows] == ["case_0001", "case_0002"]
    assert float(rows[0]["wall_s"]) == pytest.approx(mon1.wall_s, abs=1e-4)
    assert float(rows[1]["peak_rss_mb"]) == pytest.approx(mon2.peak_mb, abs=1e-4)
    assert float(rows[1]["auc_mb_s"]) == pytest.approx(mon2.auc_mb_s, abs=1e-4)
    assert rows[0]["peak_torch_mb"] == ""
    assert sorted(p.name for p in path.parent.iterdir()) == ["efficiency.csv"]  # no temporary files left

    # a new log on the same file keeps the rows; a case measured again replaces its row
    log2 = EfficiencyLog(path)
    with log2.measure("case_0001", device="cpu"):
        pass
    with open(path, newline="") as f:
        rows2 = list(csv.DictReader(f))
    assert [r["case"] for r in rows2] == ["case_0002", "case_0001"]
    assert rows2[0] == rows[1]

    # a failing block records nothing
    with pytest.raises(RuntimeError), log2.measure("case_0003", device="cpu"):
        raise RuntimeError("boom")
    assert "case_0003" not in path.read_text()

    bad = tmp_path / "bad.csv"
    bad.write_text("name,x\n1,2\n")
    with pytest.raises(Flare23Error, match="not an efficiency CSV"):
        EfficiencyLog(bad)


def test_cuda_monitor():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dev = torch.device("cuda")
    with EfficiencyMonitor(device=dev, interval=0.05) as mon:
        x = torch.ones(256 * 1024 * 1024 // 4, device=dev)  # 256 MB
        time.sleep(0.3)
        del x
    assert mon.memory_kind == "device"
    assert mon.peak_torch_mb >= 256
    assert mon.peak_mb - mon.samples[0] >= 200
    free, total = torch.cuda.mem_get_info(dev)
    assert mon.peak_mb <= total / 2**20
    assert mon.auc_mb_s == pytest.approx(sum(mon.samples) * 0.05)
