"""bench/gpu_check.py: budget planning, bench_compare command lines, merging and the report (pure logic, seconds)."""

from __future__ import annotations

import io
import sys
import tarfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_check as gc  # noqa: E402

LEAD = ("ours", "nnunet")
FOLLOW = ("nnunet_default",)
UNITS = [LEAD, FOLLOW]


def est_table(sizes, per_size):
    """``{(size, system): s}`` from ``{system: s at size 100}`` scaled linearly with the slices."""
    return {(s, sy): v * s / 100 for s in sizes for sy, v in per_size.items()}


# --- estimates -----------------------------------------------------------------------------------------
def test_extrapolate_keeps_the_constant_and_caps_it_at_half_the_run():
    assert gc.extrapolate(30.0, 100, 300, 10.0) == pytest.approx(10 + 20 * 3)
    assert gc.extrapolate(30.0, 100, 100, 10.0) == pytest.approx(30.0)
    # a constant larger than half the measured run is capped: 8 s measured, const 100 -> 4 + 4 * 3
    assert gc.extrapolate(8.0, 100, 300, 100.0) == pytest.approx(16.0)


def test_estimate_runs_prefers_measured_then_nearest_size_then_default():
    defaults = {"ours": (10.0, 0.1), "nnunet": (12.0, 0.3), "nnunet_default": (12.0, 0.9)}
    measured = {(100, "ours"): [20.0, 26.0, 22.0]}
    est = gc.estimate_runs([100, 300], ["ours", "nnunet"], measured, defaults)
    assert est[(100, "ours")] == 26.0  # the slowest measured run
    assert est[(300, "ours")] == pytest.approx(10 + 16 * 3)  # extrapolated from 100
    assert est[(100, "nnunet")] == pytest.approx(12 + 30)  # default
    assert est[(300, "nnunet")] == pytest.approx(12 + 90)
    # the nearest measured size is used
    measured[(300, "ours")] = [40.0]
    est = gc.estimate_runs([250], ["ours"], measured, defaults)
    assert est[(250, "ours")] == pytest.approx(gc.extrapolate(40.0, 300, 250, 10.0))


def test_default_units():
    assert gc.default_units(["ours", "nnunet", "nnunet_default"]) == [LEAD, FOLLOW]
    assert gc.default_units(["ours"]) == [("ours",)]
    assert gc.default_units(["nnunet_default"]) == [FOLLOW]


# --- plan_runs -----------------------------------------------------------------------------------------
def test_plan_everything_fits_up_to_max_runs():
    est = est_table([100, 300], {"ours": 10, "nnunet": 10, "nnunet_default": 10})
    plan = gc.plan_runs(10_000, [100, 300], UNITS, est, max_runs=3, overhead_s=5)
    assert plan["runs"] == {100: {LEAD: 3, FOLLOW: 3}, 300: {LEAD: 3, FOLLOW: 3}}
    assert plan["skipped"] == []
    # 3 runs of 20 + 3 of 10 at 100; 3 of 60 + 3 of 30 at 300; one overhead per size and unit (4 invocations)
    assert plan["seconds"] == pytest.approx(90 + 270 + 4 * 5)


def test_plan_coverage_first_in_priority_order_then_skips_with_reason():
    est = {(100, "ours"): 20, (100, "nnunet"): 40, (100, "nnunet_default"): 100,
           (300, "ours"): 50, (300, "nnunet"): 100, (300, "nnunet_default"): 300}  # fmt: skip
    plan = gc.plan_runs(350, [100, 300], UNITS, est, overhead_s=10)
    # coverage: 100 lead (10 + 60) + 100 default (10 + 100) + 300 lead (10 + 150) = 340 <= 350; 300 default does not fit
    assert plan["runs"] == {100: {LEAD: 1, FOLLOW: 1}, 300: {LEAD: 1}}
    assert [(s, u) for s, u, _ in plan["skipped"]] == [(300, FOLLOW)]
    assert "needs about 310 s, 10 s left" in plan["skipped"][0][2]
    assert plan["seconds"] == pytest.approx(340)


def test_plan_extras_never_starve_coverage_of_a_later_size():
    est = est_table([100, 300], {"ours": 10, "nnunet": 20, "nnunet_default": 1000})
    # coverage of both sizes' lead units costs 30 + 90 (+ overheads 2 x 5) = 130; extras of 30 at 100 only after that
    plan = gc.plan_runs(170, [100, 300], UNITS, est, overhead_s=5)
    assert plan["runs"][300] == {LEAD: 1}
    assert plan["runs"][100] == {LEAD: 2}  # 130 + 30 = 160; a third run of 30 (190) does not fit, nor one at 300 (90)
    assert {(s, u) for s, u, _ in plan["skipped"]} == {(100, FOLLOW), (300, FOLLOW)}


def test_plan_extras_round_robin_lead_units_before_followers():
    est = est_table([100, 300], {"ours": 10, "nnunet": 10, "nnunet_default": 10})
    # coverage: 20 + 10 at 100, 60 + 30 at 300 = 120; then lead extras 20 (100) and 60 (300) = 200, then default 10 at 100
    plan = gc.plan_runs(215, [100, 300], UNITS, est)
    assert plan["runs"] == {100: {LEAD: 2, FOLLOW: 2}, 300: {LEAD: 2, FOLLOW: 1}}


def test_plan_follower_is_its_own_invocation():
    est = est_table([100], {"ours": 1000, "nnunet": 1000, "nnunet_default": 1})
    plan = gc.plan_runs(2004, [100], UNITS, est, max_runs=3, overhead_s=1)
    assert plan["runs"] == {100: {LEAD: 1, FOLLOW: 2}}  # 2001 + (1 + 1) + 1: the follower runs without extra lead rounds
    assert gc.invocation_args(100, {FOLLOW: 2})["repeats"] == 2


def test_plan_follower_alone_when_the_lead_is_done():
    est = est_table([100], {"ours": 10, "nnunet": 10, "nnunet_default": 10})
    done = {(100, "ours"): 3, (100, "nnunet"): 3, (100, "nnunet_default"): 1}
    plan = gc.plan_runs(1000, [100], UNITS, est, done=done, max_runs=3)
    assert plan["runs"] == {100: {FOLLOW: 2}}
    assert gc.invocation_args(100, plan["runs"][100]) == {
        "size": 100, "systems": ["nnunet_default"], "repeats": 2, "repeats_default": 2}  # fmt: skip


def test_plan_counts_done_runs_and_pays_overhead_and_preparation_once_per_size():
    est = est_table([100, 300], {"ours": 10, "nnunet": 10, "nnunet_default": 10})
    done = {(100, "ours"): 3, (100, "nnunet"): 3, (100, "nnunet_default"): 3}
    plan = gc.plan_runs(1000, [100, 300], UNITS, est, done=done, overhead_s=7, prep_s={300: 11})
    assert 100 not in plan["runs"]
    assert plan["runs"][300] == {LEAD: 3, FOLLOW: 3}
    assert plan["seconds"] == pytest.approx(2 * 7 + 11 + 3 * 60 + 3 * 30)
    # preparation too large: nothing at 300, and the reason says how much was needed
    plan = gc.plan_runs(100, [300], UNITS, est, overhead_s=7, prep_s={300: 95})
    assert plan["runs"] == {}
    assert plan["skipped"][0][:2] == (300, LEAD) and "needs about 162 s" in plan["skipped"][0][2]


def test_plan_no_time_no_runs():
    est = est_table([100], {"ours": 10, "nnunet": 10, "nnunet_default": 10})
    plan = gc.plan_runs(0, [100], UNITS, est)
    assert plan["runs"] == {} and len(plan["skipped"]) == 2 and plan["seconds"] == 0


# --- bench_compare command lines and output ------------------------------------------------------------
def test_invocation_args_and_command():
    inv = gc.invocation_args(300, {LEAD: 2, FOLLOW: 1})
    assert inv == {"size": 300, "systems": ["ours", "nnunet", "nnunet_default"], "repeats": 2, "repeats_default": 1}
    cmd = gc.compare_command("py", inv, device="cuda", filters="32,64", threads=16, precision="fp16", budget_s=123.4,
                             work="W", out="O", nnunet_python="/nn/python")  # fmt: skip
    text = " ".join(cmd)
    assert cmd[0] == "py" and cmd[1].endswith("bench_compare.py")
    for part in ("--device cuda", "--sizes 300 ", "--no-real", "--systems ours,nnunet,nnunet_default", "--repeats 2",
                 "--repeats_nnunet_default 1", "--filters 32,64", "--threads 16", "--precision fp16", "--roi oracle",
                 "--export_sizes 0", "--export_repeats 0", "--noise_repeats 0", "--budget_s 123", "--work W", "--out O",
                 "--nnunet_python /nn/python"):  # fmt: skip
        assert part in text + " ", part
    ours_only = gc.compare_command("py", gc.invocation_args(100, {("ours",): 3}), device="cuda", filters="f", threads=1,
                                   precision="fp16", budget_s=50, work="W", out="O", nnunet_python="/nn/python")  # fmt: skip
    assert "--repeats_nnunet_default" not in ours_only and "/nn/python" not in ours_only
    assert ours_only[ours_only.index("--nnunet_python") + 1].startswith("W")  # not a file: no nnU-Net model is built
    old = gc.compare_command("py", inv, device="cuda", filters="f", threads=1, precision="fp16", budget_s=50, work="W", out="O",
                             has_default_repeats=False)  # fmt: skip
    assert "--repeats_nnunet_default" not in old


def test_failed_system():
    out = "round 1 ...\nbench_compare: error: nnunet_default on 512 x 512 x 300 failed (exit 1): CUDA out of memory\n"
    assert gc.failed_system(out) == "nnunet_default"
    assert gc.failed_system("bench_compare: error: nnU-Net model build failed (exit 1): No module named 'nnunetv2'") == "nnunet"
    assert gc.failed_system("Traceback ... KeyError") is None


def test_network_seconds():
    ours = {"roi": 1.0, "tumor_network": 2.0, "organ_network": 3.0, "tumor_aggregate": 0.5, "organ_aggregate": 0.5, "read": 9}
    assert gc.network_seconds("ours", ours) == pytest.approx(7.0)
    assert gc.network_seconds("nnunet_default", {"network": 4.0, "read": 1.0}) == 4.0
    assert gc.network_seconds("nnunet", {"read": 1.0}) is None


def _compare_json(case, per_system):
    runs = {}
    for system, secs in per_system.items():
        runs[system] = [{"stages": {"end_to_end_s": s, "network": s / 2, "organ_network": s / 4}, "peak_torch_mb": 100 * s,
                         "peak_sampled_mb": 150 * s, "peak_rss_mb": 1000.0, "engine": "torch", "precision": "fp16",
                         **({"settings": "step 0.5, mirroring"} if system != "ours" else {"crop_fraction": 0.25})}
                        for s in secs]  # fmt: skip
    return {"runs": {case: runs}, "meta": {"params": {"ours_organ": 1000, "nnunet": 990, "nnunet_network": "ResEnc"}}}


def test_merge_summarize_ratios_and_markdown():
    runs = {}
    n = gc.merge_compare(runs, _compare_json("512 x 512 x 100", {"ours": [10.0, 12.0], "nnunet": [30.0, 50.0]}), 0)
    n += gc.merge_compare(runs, _compare_json("512 x 512 x 100", {"ours": [11.0], "nnunet_default": [200.0]}), 1)
    n += gc.merge_compare(runs, _compare_json("512 x 512 x 300", {"ours": [40.0]}), 2)
    assert n == 7
    assert [r["invocation"] for r in runs["512 x 512 x 100"]["ours"]] == [0, 0, 1]
    summary = gc.summarize(runs)
    assert list(summary) == ["512 x 512 x 100", "512 x 512 x 300"]
    s = summary["512 x 512 x 100"]
    assert s["ours"]["runs"] == 3 and s["ours"]["seconds"] == 11.0 and s["ours"]["seconds_runs"] == [10.0, 12.0, 11.0]
    assert s["ours"]["peak_torch_mb"] == 1100.0 and s["ours"]["network_s"] == pytest.approx(11.0 / 4)
    assert s["ours"]["settings"] == "PyTorch fp16 autocast"
    assert (
        s["nnunet"]["seconds"] == 40.0 and s["nnunet"]["network_s"] == 20.0 and s["nnunet"]["settings"] == "step 0.5, mirroring"
    )
    r = gc.ratios(summary)
    assert r["512 x 512 x 100"]["speedup_vs_nnunet_default"] == pytest.approx(200 / 11)
    assert r["512 x 512 x 100"]["speedup_vs_nnunet"] == pytest.approx(40 / 11)
    assert r["512 x 512 x 100"]["memory_vs_nnunet"] == pytest.approx(1100 / 4000)
    assert "512 x 512 x 300" not in r  # ours alone: no ratio
    result = {
        "meta": {"date": "2026-12-07 12:00", "command": "bash bench/gpu_check.sh", "filters": "32,64,128,256,320,320",
                 "precision": "fp16", "device": "cuda", "threads": 16, "budget_s": 450, "wall_s": 432.1,
                 "nnunet_version": "2.8.1", "params": {"ours_organ": 31399004, "nnunet": 31259339, "nnunet_network": "ResEnc"},
                 "env": {"gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "driver": "580.159.04"}, "cpu": "Xeon",
                         "cores": 16, "torch": "2.11.0+cu130", "cuda": "13.0", "cudnn": 91300, "python_version": "3.12.3"}},
        "summary": summary, "ratios": r, "notes": ["512 x 512 x 300, nnU-Net v2 as its users run it (1 model): skipped"],
        "invocations": [{}, {}, {}],
    }  # fmt: skip
    md = gc.markdown(result)
    assert "NVIDIA H100 80GB HBM3 (79 GiB, driver 580.159.04)" in md
    assert "torch 2.11.0+cu130 (CUDA 13.0, cuDNN 91300)" in md and "nnU-Net v2 2.8.1" in md
    assert "31,399,004 parameters" in md
    assert (
        "| 512 x 512 x 100 | ours (ROI + organ + tumor) | PyTorch fp16 autocast, crop 25 % of the volume | 3 | 11.0 | 10.0, 12.0, 11.0 |"
        in md
    )
    assert "| 512 x 512 x 100 | 18.18x | 3.64x | 0.06 | 0.28 |" in md
    assert "skipped" in md and "Budget 450 s, used 432 s (3 bench_compare invocation(s))" in md
    assert "DRY RUN" not in md
    assert "DRY RUN" in gc.markdown({**result, "meta": {**result["meta"], "dry_run": True}})


def test_skip_notes_prefer_the_systems_failure():
    runs = {"512 x 512 x 100": {"ours": [{"seconds": 1.0}]}}
    reasons = {(100, "nnunet"): "skipped by the budget", "nnunet": "failed on 512 x 512 x 100: OOM", (300, "ours"): "budget"}
    notes = gc.skip_notes([100, 300], ["ours", "nnunet"], runs, reasons)
    assert notes == [
        "512 x 512 x 100, nnU-Net v2 at our settings (1 model): failed on 512 x 512 x 100: OOM",
        "512 x 512 x 300, ours (ROI + organ + tumor): budget",
        "512 x 512 x 300, nnU-Net v2 at our settings (1 model): failed on 512 x 512 x 100: OOM",
    ]


def test_parse_sizes():
    assert gc.parse_sizes("100,300") == [100, 300]
    with pytest.raises(ValueError):
        gc.parse_sizes("0")
    with pytest.raises(ValueError):
        gc.parse_sizes("")


# --- the hard deadline and the carried packages -----------------------------------------------------------
def test_run_logged_kills_the_process_group_at_the_deadline(capsys):
    t0 = time.monotonic()
    code = "import subprocess, sys, time; print('started', flush=True); subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    rc, output, wall = gc.run_logged([sys.executable, "-c", code], timeout_s=1.5)
    assert rc is None and "started" in output
    assert wall < 10 and time.monotonic() - t0 < 10
    rc, output, _ = gc.run_logged([sys.executable, "-c", "print('done')"], timeout_s=30)
    assert rc == 0 and output.strip() == "done"


def test_setup_unpacks_tar_xz_into_the_site(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    data = b"VALUE = 42\n"
    with tarfile.open(wheels / "fakepkg-1.0.tar.xz", "w:xz") as tar:
        info = tarfile.TarInfo("fakepkg/__init__.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert gc.main(["setup", "--wheels", str(wheels), "--site", str(site)]) == 0
    assert (site / "fakepkg" / "__init__.py").read_bytes() == data


def test_plan_falls_back_to_ours_alone_when_the_pair_does_not_fit():
    est = est_table([100, 300], {"ours": 10, "nnunet": 50, "nnunet_default": 100})
    plan = gc.plan_runs(40, [100, 300], UNITS, est, overhead_s=5)
    assert plan["runs"] == {100: {("ours",): 3}}  # 15, then extras of 10 up to 3 runs; 300's ours (30 + 5) no longer fits
    skipped = {(s, u): why for s, u, why in plan["skipped"]}
    assert set(skipped) == {(100, ("nnunet",)), (100, FOLLOW), (300, LEAD), (300, FOLLOW)}
    assert "with ours" in skipped[(100, ("nnunet",))]
    inv = gc.invocation_args(100, plan["runs"][100])
    assert inv["systems"] == ["ours"] and inv["repeats"] == 3 and inv["repeats_default"] == 0


def test_next_invocation_follows_sizes_then_unit_priority():
    plan = {"runs": {300: {LEAD: 1}, 100: {LEAD: 2, FOLLOW: 1}}}
    assert gc.next_invocation(plan, [100, 300]) == (100, LEAD, 2)
    assert gc.next_invocation({"runs": {300: {FOLLOW: 1}}}, [100, 300]) == (300, FOLLOW, 1)
    assert gc.next_invocation({"runs": {}}, [100]) is None


def test_runs_from_a_killed_invocations_log():
    output = (
        "    | organ network parameters: ours 31,399,004, nnU-Net 31259339 (ResidualEncoderUNet)\n"
        "    | round 1 512 x 512 x 100 ours: 14.2 s, peak RSS 2950 MB\n"
        "round 1 512 x 512 x 100 nnunet: 48.0 s, peak RSS 9120 MB\n"
        "    | round 2 512 x 512 x 100 ours: 13.8 s, peak RSS 2948 MB\n"
    )
    got = gc.runs_from_log(output)
    assert got == {"512 x 512 x 100": {"ours": [{"seconds": 14.2, "peak_rss_mb": 2950.0}, {"seconds": 13.8, "peak_rss_mb": 2948.0}],
                                       "nnunet": [{"seconds": 48.0, "peak_rss_mb": 9120.0}]}}  # fmt: skip
    runs = {}
    assert gc.merge_log_runs(runs, output, 4) == 3
    s = gc.summarize(runs)["512 x 512 x 100"]
    assert s["ours"]["runs"] == 2 and s["ours"]["seconds"] == pytest.approx(14.0) and s["ours"]["from_log"] == 2
    assert s["ours"]["peak_torch_mb"] is None and s["ours"]["peak_rss_mb"] == pytest.approx(2949.0)
    md = gc.markdown({"meta": {}, "summary": {"512 x 512 x 100": s}, "ratios": gc.ratios({"512 x 512 x 100": s})})
    assert "| 2 (2 from the log: no memory) | 14.0 |" in md
    assert "| 512 x 512 x 100 | not run | 3.43x | - | - |" in md


def test_parse_costs():
    assert gc.parse_costs(["nnunet_default=40,0.5", "ours=5,0"]) == {"nnunet_default": (40.0, 0.5), "ours": (5.0, 0.0)}
    for bad in ("monai=1,2", "ours=1", "ours"):
        with pytest.raises(ValueError):
            gc.parse_costs([bad])
