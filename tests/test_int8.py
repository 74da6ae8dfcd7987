"""int8 on the CPU (issue 23, item 2): ``flare23 calibrate``, NNCF-quantised OpenVINO networks, and refusals in one line."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from test_engine import WINDOW, fine
from test_pipeline_bundle import _env, _tiny_args
from test_segment_cli import checkpoints, phantom  # noqa: F401 - fixtures

from flare23.errors import Flare23Error
from flare23.inference.branches import Branch
from flare23.inference.engine import EngineNetworks, OpenVinoNetwork, check_engine
from flare23.inference.int8 import CALIBRATION_RECORD, CalibrationSet

FLARE23 = [sys.executable, "-m", "flare23"]


def _calibration(folder, volumes, windows=6, branch=None):
    """A calibration folder as ``flare23 calibrate`` writes it, from arrays (the organ model's inputs)."""
    (folder / "organ").mkdir(parents=True, exist_ok=True)
    items = []
    for k, v in enumerate(volumes):
        path = folder / "organ" / f"{k}.npy"
        np.save(path, v.astype(np.float16))
        items.append({"file": f"organ/{k}.npy", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "shape": list(v.shape)})
    branch = branch or {"target_spacing": [2.5, 0.8, 0.8], "clip_low": -100.0, "clip_high": 200.0, "mean": 50.0, "std": 40.0}
    record = {"format": 1, "windows": windows, "scans": [], "branches": {"organ": branch}, "volumes": {"organ": items}}
    (folder / CALIBRATION_RECORD).write_text(json.dumps(record))
    return folder


def _smooth(shape, seed):
    from scipy.ndimage import gaussian_filter

    v = gaussian_filter(np.random.default_rng(seed).normal(size=shape), 3)
    return (v / v.std()).astype(np.float32)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return _calibration(tmp_path_factory.mktemp("calib"), [_smooth((96, 96, 48), 0), _smooth((70, 64, 40), 1)])


def test_calibration_windows_are_drawn_evenly_from_every_window_position_that_is_not_air(tmp_path):
    air = np.full((64, 64, 32), -2.5, np.float32)  # one value: a window of air after clipping
    body = air.copy()
    body[:, :, 20:] = np.arange(64 * 64 * 12, dtype=np.float32).reshape(64, 64, 12) / 1000  # all distinct values
    cal = CalibrationSet(_calibration(tmp_path, [air, body, air], windows=50))
    got = cal.windows("organ", (32, 32, 16))
    # independent count: positions of MONAI's grid at overlap 0.5 in a 64 x 64 x 32 volume: 3 x 3 x 3; in ``body`` the windows
    # starting at slice 0 hold slices 0..15 (air only), those at 8 and 16 reach the body
    assert len(got) == 3 * 3 * 2
    assert all(w.shape == (1, 1, 32, 32, 16) and w.dtype == np.float32 and w.max() > w.min() for w in got)
    assert len(cal.windows("organ", (32, 32, 16))) == len(got)  # deterministic
    few = CalibrationSet(_calibration(tmp_path / "few", [body], windows=3)).windows("organ", (32, 32, 16))
    assert len(few) == 3
    # evenly spread: the first and the last non-air window positions are among them
    assert np.array_equal(few[0], got[0]) and np.array_equal(few[-1], got[-1])
    assert cal.windows("tumor", (32, 32, 16)) == []  # no tumor volumes in this folder


def test_int8_network_is_quantised_cached_apart_from_fp32_and_close_to_it(calib, tmp_path):
    net = fine()
    cal = CalibrationSet(calib)
    fp32 = OpenVinoNetwork(net, WINDOW, tmp_path, name="organ")
    int8 = OpenVinoNetwork(net, WINDOW, tmp_path, name="organ", precision="int8", calibration=cal)
    assert int8.converted and int8.xml != fp32.xml  # its own cache entry, never the fp32 model's
    assert "FakeQuantize" in int8.xml.read_text() and "FakeQuantize" not in fp32.xml.read_text()
    for w in cal.windows("organ", WINDOW)[:2]:
        x = torch.from_numpy(w)
        with torch.no_grad():
            ref = net(x).flatten().numpy()
        got = int8(x).flatten().numpy()
        r = np.corrcoef(ref, got)[0, 1]
        # quantised (not the fp32 logits), yet the same function: measured r = 0.98 on these random tiny networks
        assert 0.95 <= r < 0.99999, r
    again = OpenVinoNetwork(net, WINDOW, tmp_path, name="organ", precision="int8", calibration=cal)
    assert not again.converted  # read from the cache
    # another calibration set (other scans) quantises again
    other = CalibrationSet(_calibration(tmp_path / "other", [_smooth((96, 96, 48), 5)]))
    assert OpenVinoNetwork(net, WINDOW, tmp_path, name="organ", precision="int8", calibration=other).converted


def test_a_damaged_or_mismatching_calibration_is_refused_in_one_line(calib, tmp_path):
    import shutil

    folder = tmp_path / "c"
    shutil.copytree(calib, folder)
    cal = CalibrationSet(folder)
    same = Branch("organ", [2.5, 0.8, 0.8], [64, 64, 32], 0.2, -100.0, 200.0, 50.0, 40.0)
    cal.check_branch(same)
    for change, word in (({"target_spacing": [2.5, 0.8, 1.0]}, "target_spacing"), ({"mean": 51.0}, "mean")):
        other = Branch(**{**same.__dict__, **change})
        with pytest.raises(Flare23Error, match=f"with {word} .* the model uses .* run flare23 calibrate again"):
            cal.check_branch(other)
    with pytest.raises(Flare23Error, match="no calibration for the tumor model"):
        cal.check_branch(Branch(**{**same.__dict__, "name": "tumor"}))
    volume = folder / "organ" / "1.npy"
    volume.write_bytes(volume.read_bytes()[:-10])
    with pytest.raises(Flare23Error, match=r"1\.npy: calibration volume missing or damaged"):
        cal.windows("organ", WINDOW)
    (folder / CALIBRATION_RECORD).write_text("{not json")
    with pytest.raises(Flare23Error, match="not a calibration record"):
        CalibrationSet(folder)
    with pytest.raises(Flare23Error, match="not a calibration folder"):
        CalibrationSet(tmp_path / "nowhere")


def test_int8_needs_openvino_on_the_cpu_and_a_calibration(calib):
    assert check_engine("auto", "int8", "cpu", calib) == "openvino"
    assert check_engine("torch", "fp32", "cpu") == "torch"
    for engine, device, cal, word in (("torch", "cpu", calib, "engine is torch"), ("auto", "cuda", calib, "the device is cuda"),
                                      ("openvino", "cpu", "", "needs --int8_calibration")):  # fmt: skip
        with pytest.raises(Flare23Error, match=word):
            check_engine(engine, "int8", device, cal)
    with pytest.raises(Flare23Error, match="OpenVINO engine"):
        EngineNetworks("torch", precision="int8", calibration=calib)
    # a calibration made for other settings is refused when the cascade is built, before any case
    with pytest.raises(Flare23Error, match="target_spacing"):
        EngineNetworks("openvino", precision="int8", calibration=calib,
                       branches=[Branch("organ", [3.0, 0.8, 0.8], [64, 64, 32], 0.2, -100.0, 200.0, 50.0, 40.0)])  # fmt: skip


def test_calibrate_then_segment_int8_end_to_end(phantom, checkpoints, tmp_path):  # noqa: F811
    args = [a for a in _tiny_args() if a not in ("--load_pretrain", "false", "--precision", "fp32")]
    for part in ("roi", "organ", "tumor"):
        args += [f"--{part}_ckpt", str(checkpoints[part])]
    cal = tmp_path / "cal"
    r = subprocess.run([*FLARE23, "calibrate", str(phantom / "a.1.nii.gz"), "--out", str(cal), "--windows", "4", *args],
                       capture_output=True, text=True, env=_env(), timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((cal / CALIBRATION_RECORD).read_text())
    assert [s["case"] for s in record["scans"]] == ["a.1"] and record["branches"]["organ"]["target_spacing"] == [6.0, 6.0, 6.0]
    made = sorted(p.name for p in (checkpoints["organ"].parent / ".openvino").glob("*.xml") if "FakeQuantize" in p.read_text())
    assert len(made) == 2 and "int8 network made" in r.stdout, r.stdout  # organ and tumor, quantised and cached
    outs = {}
    for name, extra in (("fp32", ["--engine", "openvino", "--precision", "fp32"]),
                        ("int8", ["--engine", "openvino", "--precision", "int8", "--int8_calibration", str(cal)])):  # fmt: skip
        out = tmp_path / name / "seg.nii.gz"
        r = subprocess.run([*FLARE23, "segment", "-i", str(phantom / "a.17.nii.gz"), "-o", str(out), *extra, *args],
                           capture_output=True, text=True, env=_env(), timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = np.asarray(nib.load(str(out)).dataobj)
        timings = (out.parent / "seg_timings.csv").read_text()
        assert "organ_convert" in timings
    assert outs["int8"].shape == outs["fp32"].shape
    # segment found the int8 networks in the cache: nothing new was quantised
    after = sorted(p.name for p in (checkpoints["organ"].parent / ".openvino").glob("*.xml") if "FakeQuantize" in p.read_text())
    assert after == made
    # the calibration was made with the organ model at 6 mm: the same weights at 5 mm are refused, one line, exit 2, no output
    bad = [a if a != _tiny_args()[_tiny_args().index("--organ_overrides") + 1] else a.replace("[6.0, 6.0, 6.0]", "[5.0, 5.0, 5.0]")
           for a in args]  # fmt: skip
    out = tmp_path / "bad" / "seg.nii.gz"
    r = subprocess.run([*FLARE23, "segment", "-i", str(phantom / "a.17.nii.gz"), "-o", str(out), "--engine", "openvino",
                        "--precision", "int8", "--int8_calibration", str(cal), *bad], capture_output=True, text=True, env=_env(), timeout=600)  # fmt: skip
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("flare23: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "target_spacing" in errors[0] and str(cal) in errors[0], r.stderr[-2000:]
    assert not out.exists()


def test_calibrate_refuses_options_that_would_make_other_inputs(tmp_path):
    from flare23.inference.calibrate import calibrate

    # int8 runs on the CPU: a calibration prepared elsewhere, or for another precision or engine, is refused before any work
    for key, value in (("device", "cuda"), ("precision", "bf16"), ("engine", "torch")):
        with pytest.raises(Flare23Error, match=f"--{key}: not an option of flare23 calibrate"):
            calibrate([str(tmp_path / "missing.nii.gz")], tmp_path / "out", **{key: value})
    assert not (tmp_path / "out").exists()
