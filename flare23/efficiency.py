"""Efficiency measurements as FLARE 2023 defines them: wall time, sampled peak memory, memory-time area.

:class:`EfficiencyMonitor` is a context manager that works around any block of code::

    with EfficiencyMonitor(device="cuda") as mon:
        run_case()
    mon.wall_s, mon.peak_mb, mon.peak_torch_mb, mon.auc_mb_s

A background thread reads the memory at entry, then every ``interval`` seconds (0.1 s, the
challenge's rate), and once more at exit; ``samples`` holds the readings in MB (MiB, as nvidia-smi
prints them), ``peak_mb`` is their maximum and ``auc_mb_s`` = ``sum(samples) * interval`` (MB s),
the area under the memory-time curve of METHOD.md section 6.

* CUDA device: the whole device's used memory, ``total - free`` from ``torch.cuda.mem_get_info``
  (what nvidia-smi reports as used, other processes included); ``peak_torch_mb`` is
  ``torch.cuda.max_memory_allocated`` over the block (peak statistics reset at entry).
* CPU: the resident set size of this process, from ``/proc/self/statm`` (``resource``'s peak RSS
  where ``/proc`` is missing); ``peak_torch_mb`` is ``None``.

``device=None`` means CUDA when torch sees a GPU, else CPU (pass ``"cpu"`` to avoid importing torch).
:class:`EfficiencyLog` keeps one CSV row per case, rewriting the file atomically after each case.

:func:`available_cpus` is the number of CPUs this process may use (its affinity mask, lowered to
the cgroup CPU quota of a container); :func:`set_threads` gives torch that many threads (the
pipeline bundle's ``threads`` id, ``flare23 segment --threads N``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from flare23.errors import Flare23Error
from flare23.io import atomic_write_text, ensure_output_dir

MIB = 1024.0 * 1024.0

__all__ = [
    "EfficiencyMonitor",
    "EfficiencyLog",
    "available_cpus",
    "cgroup_cpu_limit",
    "parse_threads",
    "process_rss_mb",
    "set_threads",
]

CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_cpu_limit(root: str | os.PathLike = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``1.5`` = 150 ms per 100 ms), or None when unlimited.

    cgroup v2: ``<root>/cpu.max`` (``"max 100000"`` or ``"150000 100000"``); cgroup v1:
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in ``<root>/cpu``, ``<root>/cpu,cpuacct`` or ``<root>``
    (quota -1 = unlimited). Inside a container ``<root>`` is the container's own cgroup.
    """
    text = _read(os.path.join(root, "cpu.max"))
    if text:
        parts = text.split()
        try:
            return None if parts[0] == "max" else int(parts[0]) / int(parts[1])
        except (IndexError, ValueError, ZeroDivisionError):
            return None
    for sub in ("cpu", "cpu,cpuacct", ""):
        quota = _read(os.path.join(root, sub, "cpu.cfs_quota_us"))
        period = _read(os.path.join(root, sub, "cpu.cfs_period_us"))
        if quota is not None and period is not None:
            try:
                q, p = int(quota), int(period)
            except ValueError:
                return None
            return q / p if q > 0 and p > 0 else None
    return None


def available_cpus(cgroup_root: str | os.PathLike = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask (``os.sched_getaffinity``), at most the cgroup quota (floored, >= 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        n = min(n, int(limit))
    return max(1, n)


def parse_threads(threads) -> int:
    """``threads`` as a whole number >= 0, else a one-line error."""
    try:
        n = int(threads)
        if isinstance(threads, bool) or n != float(threads) or n < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise Flare23Error(f"threads {threads!r}: expected a whole number >= 0 (0 = the CPUs this process may use)") from None
    return n


def set_threads(threads=0) -> int:
    """``torch.set_num_threads``: ``threads`` > 0 as given, 0 (auto) = ``OMP_NUM_THREADS`` when set, else :func:`available_cpus`.

    Returns the number set. torch's own default counts every core of the machine, also those that
    the process may not use (a container's quota, ``taskset``), and oversubscribed threads are
    several times slower than fewer.
    """
    import torch

    n = parse_threads(threads)
    if n == 0:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        n = int(env) if env.isdigit() and int(env) > 0 else available_cpus()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def process_rss_mb() -> float:
    """Current resident set size of this process in MB (MiB)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux: the peak, not the current


def _resolve_device(device):
    """``"cpu"`` or a ``torch.device`` of type cuda."""
    if device is None:
        try:
            import torch
        except ImportError:
            return "cpu"
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    if str(device) == "cpu":
        return "cpu"
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise Flare23Error(f"EfficiencyMonitor: unsupported device {device!r} (cpu or cuda)") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise Flare23Error(f"EfficiencyMonitor: unsupported device {device!r} (cpu or cuda)")
    if not torch.cuda.is_available():
        raise Flare23Error(f"EfficiencyMonitor: device {device!r} requested but CUDA is not available")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


class EfficiencyMonitor:
    """Measure wall time and sampled memory of a ``with`` block (see the module docstring)."""

    def __init__(self, device=None, interval: float = 0.1):
        try:
            self.interval = float(interval)
        except (TypeError, ValueError):
            raise Flare23Error(f"EfficiencyMonitor: interval {interval!r} is not a number") from None
        if not self.interval > 0:
            raise Flare23Error(f"EfficiencyMonitor: interval must be positive, got {interval}")
        self.device = _resolve_device(device)
        self.is_cuda = self.device != "cpu"
        self.samples: list[float] = []
        self.wall_s: float | None = None
        self.peak_mb: float | None = None
        self.peak_torch_mb: float | None = None
        self.auc_mb_s: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    @property
    def memory_kind(self) -> str:
        """``"device"`` (whole-GPU used memory) or ``"rss"`` (process resident memory)."""
        return "device" if self.is_cuda else "rss"

    def read_mb(self) -> float:
        """One memory reading in MB."""
        if self.is_cuda:
            import torch

            free, total = torch.cuda.mem_get_info(self.device)
            return (total - free) / MIB
        return process_rss_mb()

    def _sample_loop(self) -> None:
        next_t = self._t0 + self.interval
        while not self._stop.wait(max(0.0, next_t - time.perf_counter())):
            self.samples.append(self.read_mb())
            next_t += self.interval

    def __enter__(self) -> EfficiencyMonitor:
        if self._thread is not None:
            raise Flare23Error("EfficiencyMonitor: already running (use one monitor per block)")
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.samples = [self.read_mb()]
        self.wall_s = self.peak_mb = self.peak_torch_mb = self.auc_mb_s = None
        self._stop.clear()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample_loop, name="flare23-efficiency", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)
        self.wall_s = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.samples.append(self.read_mb())
        self.peak_mb = max(self.samples)
        self.auc_mb_s = sum(self.samples) * self.interval
        if self.is_cuda:
            import torch

            self.peak_torch_mb = torch.cuda.max_memory_allocated(self.device) / MIB
        return False

    def as_row(self, case: str) -> dict:
        """The CSV row of this measurement (after the block has run)."""
        if self.wall_s is None:
            raise Flare23Error("EfficiencyMonitor: no measurement yet (use it as a context manager first)")
        return {
            "case": case,
            "wall_s": self.wall_s,
            f"peak_{self.memory_kind}_mb": self.peak_mb,
            "peak_torch_mb": self.peak_torch_mb,
            "auc_mb_s": self.auc_mb_s,
        }


class EfficiencyLog:
    """Per-case efficiency CSV: ``case, wall_s, peak_rss_mb | peak_device_mb, peak_torch_mb, auc_mb_s``.

    Each :meth:`add` rewrites the whole file atomically (so a reader never sees half a row and an
    interrupted run keeps every finished case). Rows of an existing file with the same columns are
    kept; a case measured again replaces its row.
    """

    def __init__(self, csv_path: str | os.PathLike):
        self.path = Path(csv_path)
        self.columns: list[str] | None = None
        self.rows: list[dict] = []
        if self.path.exists():
            try:
                with open(self.path, newline="", encoding="utf-8") as f:
                    reader = csv.DictReader(f)
                    self.columns = list(reader.fieldnames or [])
                    self.rows = list(reader)
            except (OSError, UnicodeDecodeError, csv.Error) as exc:
                raise Flare23Error(f"{self.path}: cannot read the existing efficiency CSV ({exc})") from None
            if self.columns and self.columns[0] != "case":
                raise Flare23Error(f"{self.path}: not an efficiency CSV (first column {self.columns[0]!r}, expected 'case')")
            if not self.columns:
                self.columns = None

    def add(self, case: str, monitor: EfficiencyMonitor) -> dict:
        row = monitor.as_row(str(case))
        columns = list(row)
        if self.columns is None:
            self.columns = columns
        elif self.columns != columns:
            raise Flare23Error(
                f"{self.path}: columns {columns} differ from the file's {self.columns} (CPU and GPU rows in one log?)"
            )
        self.rows = [r for r in self.rows if r["case"] != row["case"]] + [row]
        self._write()
        return row

    @contextlib.contextmanager
    def measure(self, case: str, device=None, interval: float = 0.1) -> Iterator[EfficiencyMonitor]:
        """``with log.measure("case_0001"): ...`` records the block's row when it succeeds."""
        monitor = EfficiencyMonitor(device=device, interval=interval)
        with monitor:
            yield monitor
        self.add(case, monitor)

    def _write(self) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(["" if row.get(k) is None else _fmt(row.get(k)) for k in self.columns])
        ensure_output_dir(self.path.parent)
        atomic_write_text(self.path, buf.getvalue())


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
