"""``flare23 segment`` and the pipeline bundle's command lines: errors, side files, threads, options, help.

Runs use random tiny networks (``_tiny_args`` of test_pipeline_bundle) on one tiny phantom.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_pipeline_bundle import CONFIG, ROOT, _env, _tiny_args

FLARE23 = [sys.executable, "-m", "flare23"]
MONAI_RUN = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", str(CONFIG),
             "--bundle_root", str(ROOT / "bundles" / "pipeline")]  # fmt: skip
TINY_ROI = [4, 8, 8, 8, 8]
TINY_FINE = [4, 8, 8, 8, 8, 8]


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("flare23: error:")]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from flare23.tools.phantoms.generate import make_phantom

    d = tmp_path_factory.mktemp("segment_in")
    case = make_phantom(3, size="tiny", orientation="LPS")
    for name in ("a.1.nii.gz", "a.17.nii.gz"):
        nib.save(nib.Nifti1Image(case["image"], case["affine"]), str(d / name))
    return d


# --- 1. a checkpoint that does not fit: one line, exit 2, never an abort ----------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Tiny sub-network checkpoints, plus organ / ROI ones of other widths."""
    from flare23.bundles import SubBundle

    d = tmp_path_factory.mktemp("ckpts")
    filters = {"roi": TINY_ROI, "organ": TINY_FINE, "tumor": TINY_FINE}
    other = {"roi": [8, 8, 8, 8, 8], "organ": [8, 8, 8, 8, 8, 8]}
    folders = {"roi": "roi_extractor", "organ": "organ_seg", "tumor": "tumor_seg"}
    paths = {}
    for part, widths in [*filters.items(), *((f"bad_{k}", v) for k, v in other.items())]:
        bundle = ROOT / "bundles" / folders[part.removeprefix("bad_")]
        net = SubBundle(bundle, "inference.json", {"network_def#filters": widths}).network()
        paths[part] = d / f"{part}.pt"
        torch.save(net.state_dict(), str(paths[part]))
    return paths


@pytest.mark.parametrize("bad, runs", [("roi", 5), ("organ", 2)])  # a bad ROI checkpoint aborted 3 runs in 4
def test_a_mismatching_checkpoint_ends_with_one_line_and_exit_2_never_an_abort(phantom, checkpoints, tmp_path, bad, runs):
    ckpts = {p: checkpoints[f"bad_{p}" if p == bad else p] for p in ("roi", "organ", "tumor")}
    args = [a for a in _tiny_args() if a not in ("--load_pretrain", "false")]
    for p, path in ckpts.items():
        args += [f"--{p}_ckpt", str(path)]
    for k in range(runs):
        out = tmp_path / f"run{k}" / "seg.nii.gz"
        r = subprocess.run([*FLARE23, "segment", "-i", str(phantom / "a.1.nii.gz"), "-o", str(out), *args],
                           capture_output=True, text=True, env=_env(), timeout=600)  # fmt: skip
        assert r.returncode == 2, (k, r.returncode, r.stderr[-3000:])
        assert "terminate called" not in r.stderr
        errors = _errors(r.stderr)
        assert len(errors) == 1 and f"bad_{bad}.pt" in errors[0] and "do not match" in errors[0], r.stderr[-3000:]
        assert ".flare23-" not in r.stderr and not out.exists()


def test_the_weight_loader_is_joined_and_its_error_is_fatal_for_the_run(checkpoints):
    from flare23.bundles import SubBundle
    from flare23.inference.branches import CascadeNetworks
    from flare23.inference.weights import WeightsError

    nets = CascadeNetworks(
        *(SubBundle(ROOT / "bundles" / b, "inference.json", {"network_def#filters": f}).network()
          for b, f in (("roi_extractor", TINY_ROI), ("organ_seg", TINY_FINE), ("tumor_seg", TINY_FINE)))
    )  # fmt: skip
    thread = nets.load_async(checkpoints["roi"], checkpoints["bad_organ"], checkpoints["tumor"])
    assert not thread.daemon  # the interpreter waits for it at exit, never kills it inside torch
    nets.join()
    assert not thread.is_alive()
    assert nets.wait("roi") is nets.roi
    with pytest.raises(WeightsError, match="bad_organ.pt"):
        nets.wait("organ")
    nets.close()  # idempotent


# --- 2, 3, 5c, 5e. side files per case, ROI record, threads, file modes, no MONAI logging notice -------------------------
def test_side_files_are_named_per_case_with_the_roi_record_threads_and_the_umask(phantom, tmp_path):
    from flare23.efficiency import available_cpus

    out = tmp_path / "out"
    runs = {"a.1": ["--threads", "1"], "a.17": []}  # a.17: the default thread count
    for case, extra in runs.items():
        env = _env()
        if not extra:
            env.pop("OMP_NUM_THREADS", None)
        cmd = [
            *FLARE23,
            "segment",
            "-i",
            str(phantom / f"{case}.nii.gz"),
            "-o",
            str(out / f"{case}.nii.gz"),
            *_tiny_args(),
            *extra,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, umask=0o022)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Logging file is set to False" not in r.stdout + r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{c}{s}" for c in runs for s in (".nii.gz", "_efficiency.csv", "_roi.json", "_timings.csv"))
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # the umask's mode, not mkstemp's 0600
    for case in runs:
        record = json.loads((out / f"{case}_roi.json").read_text())
        assert record["case"] == case and record["source"].endswith(f"{case}.nii.gz")
        assert record["stage_seconds"]["organ_network"] > 0 and record["total_s"] > 0
        windows = record["windows"]  # skipping is off by default: every window of both branches ran
        assert windows["organ_windows_run"] >= 1 and windows["tumor_windows_run"] >= 1
        assert windows["organ_windows_skipped"] == windows["tumor_windows_skipped"] == 0
        assert record["threads"] == (1 if runs[case] else available_cpus())
        box, img = record["roi_box"], nib.load(str(phantom / f"{case}.nii.gz"))
        assert not box["empty"] and box["image_shape"] == list(img.shape)
        # the box's outer voxel-edge corners in world mm, computed here from its voxel indices and the input's affine
        lo, hi = np.array(box["start"]) - 0.5, np.array(box["stop"]) - 0.5
        corners = [[(lo, hi)[b][i] for i, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)]
        world = [(img.affine @ np.array([*c, 1.0]))[:3] for c in corners]
        assert np.allclose(box["corners_mm"], world, atol=1e-3)
        rows = (out / f"{case}_timings.csv").read_text().splitlines()
        assert len(rows) == 2 and rows[1].startswith(f"{case},")


def test_threads_follow_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    from flare23 import efficiency
    from flare23.errors import Flare23Error

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    v2 = tmp_path / "v2"
    v2.mkdir()
    assert efficiency.cgroup_cpu_limit(v2) is None and efficiency.available_cpus(v2) == 8  # no cgroup files
    (v2 / "cpu.max").write_text("max 100000\n")
    assert efficiency.cgroup_cpu_limit(v2) is None and efficiency.available_cpus(v2) == 8
    (v2 / "cpu.max").write_text("250000 100000\n")
    assert efficiency.cgroup_cpu_limit(v2) == 2.5 and efficiency.available_cpus(v2) == 2
    (v2 / "cpu.max").write_text("50000 100000\n")
    assert efficiency.available_cpus(v2) == 1  # half a CPU: still one thread
    v1 = tmp_path / "v1" / "cpu,cpuacct"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert efficiency.available_cpus(tmp_path / "v1") == 3
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert efficiency.available_cpus(tmp_path / "v1") == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert efficiency.available_cpus(tmp_path / "v1") == 2  # taskset / affinity below the quota

    before = torch.get_num_threads()
    try:
        assert efficiency.set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert efficiency.set_threads(0) == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(efficiency, "available_cpus", lambda: 2)
        assert efficiency.set_threads("0") == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for bad in (-1, 1.5, "many", True):
        with pytest.raises(Flare23Error, match="threads"):
            efficiency.parse_threads(bad)


def test_outputs_get_the_umask_mode(tmp_path):
    from flare23.io import atomic_write_text, save_nifti

    old = os.umask(0o027)
    try:
        save_nifti(np.zeros((2, 2, 2), np.uint8), np.eye(4), tmp_path / "a.nii.gz")
        atomic_write_text(tmp_path / "a.csv", "x\n")
        os.umask(0o022)
        atomic_write_text(tmp_path / "b.csv", "x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.nii.gz").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "a.csv").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "b.csv").stat().st_mode) == 0o644


# --- 4. no option is silently ignored ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, named",
    [
        (["--precison", "fp32"], "'precision'"),
        (["--organ_overrides", "{'patch_sise': [64, 64, 32]}"], "'patch_size'"),
        (["--engin", "openvino"], "'engine'"),
        (["--inferer#blok", "64"], "'block'"),
    ],
)
def test_an_unknown_option_is_refused_before_any_work(phantom, tmp_path, option, named):
    out = tmp_path / "never" / "seg.nii.gz"
    t0 = time.monotonic()
    r = subprocess.run([*FLARE23, "segment", "-i", str(phantom / "a.1.nii.gz"), "-o", str(out), "--load_pretrain", "false", *option],
                       capture_output=True, text=True, env=_env(), timeout=300)  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    errors = _errors(r.stderr)
    assert len(errors) == 1 and named in errors[0] and option[0].lstrip("-").split("#")[0] in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not out.parent.exists()  # no output folder: nothing ran
    assert time.monotonic() - t0 < 60


def test_sub_bundle_refuses_override_keys_its_config_does_not_define():
    from monai.bundle import ConfigParser

    from flare23.bundles import SubBundle, check_id
    from flare23.errors import Flare23Error

    roi = ROOT / "bundles" / "roi_extractor"
    SubBundle(roi, "inference.json", {"network_def#filters": TINY_ROI, "margins_mm": {"head": 5.0}})  # defined: accepted
    with pytest.raises(Flare23Error, match="'tile'"):
        SubBundle(roi, "inference.json", {"tiles": 3})
    margins = SubBundle(roi, "inference.json", {}).parser["margins_mm"]
    with pytest.raises(Flare23Error, match="margins_mm#zz"):  # a nested merge checks each sub-key
        SubBundle(roi, "inference.json", {"margins_mm": {next(iter(margins)): 1.0, "zz": 1.0}})
    parser = ConfigParser({"a": {"b": [1, 2]}, "inferer": {"_target_": "flare23.inference.cascade.CascadeInferer", "block": 3}})
    for ok in ("a", "a#b", "a#b#1", "inferer#block", "inferer#precision"):
        check_id(parser, ok, "test")
    for bad, match in (("a#c", "'a#c'"), ("a#b#2", "list of 2"), ("x#y", "'x'"), ("inferer#blok", "did you mean 'block'")):
        with pytest.raises(Flare23Error, match=match):
            check_id(parser, bad, "test")


# --- 4, 5d. the MONAI route: unknown ids refused, a user error as the first line of stderr -------------------------------
@pytest.mark.parametrize(
    "option, first",
    [
        (["--dataset_dir", "MISSING_FOLDER", "--load_pretrain", "false"], "MISSING_FOLDER: no such file"),
        (["--precison", "fp32"], "did you mean 'precision'"),
    ],
)
def test_monai_bundle_run_prints_the_user_error_first(tmp_path, option, first):
    option = [str(tmp_path / o) if o == "MISSING_FOLDER" else o for o in option]
    if "--dataset_dir" not in option:
        option += ["--dataset_dir", str(tmp_path)]
    r = subprocess.run([*MONAI_RUN, "--output_dir", str(tmp_path / "out"), *option],
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)  # fmt: skip
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert lines and lines[0].startswith("flare23: error:") and first in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and len(lines) <= 3


# --- 5a, 5b. help and paths in messages ----------------------------------------------------------------------------------
def test_every_command_prints_its_help(capsys):
    from flare23.cli import _commands, main

    for name in _commands():
        main([name, "--help"])  # returns: exit status 0
        text = capsys.readouterr().out
        assert f"flare23 {name}" in text and "SYNOPSIS" in text, name
    main(["segment", "-h"])
    text = capsys.readouterr().out
    assert "--threads" in text and '--precision="auto"' in text and "--threads=0" in text and "--block_size=150" in text
    main(["--help"])
    assert "segment" in capsys.readouterr().out
    r = subprocess.run([*FLARE23, "segment", "--help"], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0 and "flare23 segment" in r.stdout and "error" not in r.stderr, r.stderr


def test_messages_name_the_users_output_not_the_temporary_folder(tmp_path):
    from flare23.errors import Flare23Error
    from flare23.inference.segment import _user_paths

    work = tmp_path / "out" / ".flare23-abc"
    dst = tmp_path / "out" / "a.1.nii.gz"
    exc = Flare23Error(f"{work}/case.nii.gz: disk full; {work}/timings.csv: cannot write; written to {work}")
    text = str(_user_paths(exc, work, dst, "case.nii.gz", "a.1"))
    assert ".flare23-" not in text
    assert f"{dst}: disk full" in text and f"{dst.parent / 'a.1_timings.csv'}: cannot" in text and text.endswith(str(dst.parent))


def test_monai_command_line_overrides_are_checked_against_the_merged_files(tmp_path):
    from flare23.bundles import refuse_unknown_ids
    from flare23.errors import Flare23Error

    base = ["run", "evaluating", "--config_file", str(CONFIG), "--bundle_root", "b", "--meta_file", "m.json"]
    refuse_unknown_ids([*base, "--precision", "fp32", "--inferer#block", "64", "--load_pretrain=false", "--run_id", "x"])
    with pytest.raises(Flare23Error, match="did you mean 'precision'"):
        refuse_unknown_ids([*base, "--precison", "fp32"])
    with pytest.raises(Flare23Error, match="did you mean 'block'"):
        refuse_unknown_ids([*base, "--inferer#blok=64"])
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"my_id": 1}))
    listed = ["run", "--config_file", json.dumps([str(CONFIG), str(extra)]), "--my_id", "2"]
    refuse_unknown_ids(listed)  # an id of an extra config file of the user's is an id
    with pytest.raises(Flare23Error, match="my_idd"):
        refuse_unknown_ids([*listed, "--my_idd", "3"])
    refuse_unknown_ids(["run", "--precison", "fp32"])  # no config file named: nothing to compare with
