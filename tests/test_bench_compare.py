"""Fast checks of bench/bench_compare.py and bench/_nnunet_side.py (the pure parts, and nnU-Net's side where its environment exists)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _nnunet_side as nn_side  # noqa: E402
import bench_compare as bc  # noqa: E402
import bench_pipeline as bp  # noqa: E402

from flare23 import constants as C  # noqa: E402

NNUNET_PY = ROOT / "bench" / ".venv-nnunet" / "bin" / "python"
needs_nnunet = pytest.mark.skipif(not NNUNET_PY.is_file(), reason="nnU-Net's environment missing (bash bench/nnunet_env.sh)")
TINY = [4, 8, 16, 16, 16, 16]


def test_plans_follow_our_organ_model():
    plans = nn_side.nnunet_plans(TINY)
    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg["architecture"]["arch_kwargs"]
    # nnU-Net (SimpleITK) arrays are (z, y, x): our XYZ values reversed
    assert cfg["spacing"] == [C.ORGAN_SPACING_XYZ[2], C.ORGAN_SPACING_XYZ[1], C.ORGAN_SPACING_XYZ[0]]
    assert cfg["patch_size"] == [C.ORGAN_PATCH_XYZ[2], C.ORGAN_PATCH_XYZ[1], C.ORGAN_PATCH_XYZ[0]]
    assert arch["kernel_sizes"] == [[k[2], k[1], k[0]] for k in C.KERNELS_XYZ]
    assert arch["strides"] == [[s[2], s[1], s[0]] for s in C.ORGAN_STRIDES_XYZ]
    assert arch["features_per_stage"] == TINY and arch["n_stages"] == 6
    fp = plans["foreground_intensity_properties_per_channel"]["0"]
    organ = C.FINGERPRINT_DEFAULTS["organ"]
    assert (fp["percentile_00_5"], fp["percentile_99_5"], fp["mean"], fp["std"]) == (
        organ["clip_low"], organ["clip_high"], organ["mean"], organ["std"],
    )  # fmt: skip
    assert cfg["normalization_schemes"] == ["CTNormalization"]
    labels = nn_side.nnunet_dataset_json()["labels"]
    assert sorted(labels.values()) == list(range(C.NUM_CLASSES)) and labels["tumor"] == C.TUMOR_ID
    assert nn_side.tile_step_size() == pytest.approx(1 - C.ORGAN_OVERLAP)
    with pytest.raises(ValueError):
        nn_side.nnunet_plans([4, 8, 16])


def test_preprocessed_shape_and_smooth_logits():
    assert bc.preprocessed_shape((100, 512, 512), (3.0, 0.8, 0.8), (2.5, 0.82, 0.82)) == (120, 500, 500)
    a = bc.smooth_logits(15, (10, 33, 40), seed=1)
    b = bc.smooth_logits(15, (10, 33, 40), seed=1)
    assert a.shape == (15, 10, 33, 40) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, bc.smooth_logits(15, (10, 33, 40), seed=2))
    # smooth: neighbouring voxels differ much less than the values spread
    assert (a[:, :, :, 1:] - a[:, :, :, :-1]).abs().mean() < 0.2 * a.std()
    assert len(torch.unique(a.argmax(0))) > 3


def test_stage_breakdown_sums_to_end_to_end():
    ours = {"read": 1.0, "roi": 2.0, "crop": 0.5, "tumor_preprocess": 1.0, "tumor_network": 3.0, "tumor_resample": 0.5,
            "organ_preprocess": 1.5, "organ_network": 4.0, "organ_resample": 1.0, "ensemble": 0.2, "postprocess": 0.3,
            "paste": 0.1, "write": 0.6, "total_s": 15.0, "end_to_end_s": 20.0}  # fmt: skip
    b = bc.stage_breakdown("ours", ours)
    assert b["network"] == pytest.approx(9.0) and b["preprocess"] == pytest.approx(3.0)
    assert b["to_original_grid"] == pytest.approx(1.6) and b["postprocess"] == pytest.approx(0.5)
    assert sum(b[s] for s in bc.STAGES) == pytest.approx(20.0)
    monai = {"read": 2.0, "tumor_preprocess": 3.0, "tumor_network": 5.0, "tumor_invert_argmax": 4.0, "organ_preprocess": 4.0,
             "organ_network": 6.0, "organ_invert_argmax": 5.0, "ensemble_postprocess": 2.0, "write": 1.0, "end_to_end_s": 33.0}  # fmt: skip
    m = bc.stage_breakdown("monai", monai)
    assert (
        m["preprocess"] == pytest.approx(5.0) and m["to_original_grid"] == pytest.approx(9.0) and m["other"] == pytest.approx(3.0)
    )
    n = bc.stage_breakdown("nnunet", {"load_network": 2, "read": 1, "preprocess": 3, "network": 10, "to_original_grid": 6, "write": 1,
                                      "end_to_end_s": 23})  # fmt: skip
    assert n["other"] == pytest.approx(2.0) and n["postprocess"] == 0.0
    with pytest.raises(ValueError):
        bc.stage_breakdown("other", {"end_to_end_s": 1})
    # every engine of ours has ours' stages, both nnU-Net modes nnU-Net's; OpenVINO's cache read + compile is set-up
    assert bc.stage_breakdown("ours_int8", dict(ours, organ_convert=0.7)) == b
    assert bc.stage_breakdown("ours_openvino", ours)["network"] == pytest.approx(9.0)
    d = bc.stage_breakdown("nnunet_default", {"read": 1, "network": 30, "end_to_end_s": 40})
    assert d["network"] == 30 and d["other"] == pytest.approx(9.0)


def _run(system, end, rss):
    return {"breakdown": bc.stage_breakdown(system, {"network": end / 2, "end_to_end_s": end}), "peak_rss_mb": rss,
            "auc_mb_s": rss * end, "peak_sampled_mb": rss, "peak_torch_mb": None}  # fmt: skip


def test_summary_ratios_goals_and_markdown():
    ours = [dict(_run("ours", e, r), engine="torch", precision="fp32", roi="oracle", roi_weights="random", crop_fraction=c)
            for e, r, c in ((10, 3000, 0.30), (12, 3100, 0.25), (30, 2900, 0.20))]  # fmt: skip
    ov = [dict(_run("ours_openvino", e, 2000), engine="openvino", precision="fp32", roi="oracle") for e in (5, 6, 7)]
    nn = [_run("nnunet", e, r) for e, r in ((50, 9000), (40, 8000), (45, 8500))]
    nd = [dict(_run("nnunet_default", 130, 9500), settings="PyTorch, step 0.5 (nnU-Net's default), Gaussian, mirroring z, y, x")]
    summary = {
        "512 x 512 x 500": {
            "ours": bc.summarize(ours),
            "ours_openvino": bc.summarize(ov),
            "nnunet": bc.summarize(nn),
            "nnunet_default": bc.summarize(nd),
        }
    }
    s = summary["512 x 512 x 500"]
    assert s["ours"]["end_to_end"] == statistics.median([10, 12, 30]) and s["ours"]["peak_rss_mb"] == 3000
    assert "peak_torch_mb" not in s["ours"] and s["ours"]["runs"] == 3 and s["nnunet_default"]["runs"] == 1
    assert s["ours"]["crop_fraction"] == pytest.approx(0.25) and s["ours"]["engine"] == "torch"
    r = bc.ratios(summary)["512 x 512 x 500"]
    assert set(r) == {"ours", "ours_openvino"}  # one row per engine of ours, against every other system present
    assert r["ours"]["speedup_vs_nnunet"] == pytest.approx(45 / 12) and r["ours"]["rss_vs_nnunet"] == pytest.approx(3000 / 8500)
    assert r["ours_openvino"]["speedup_vs_nnunet_default"] == pytest.approx(130 / 6) and "speedup_vs_monai" not in r["ours"]
    result = {
        "meta": {
            "hardware": "test CPU",
            "device": "cpu",
            "filters": TINY,
            "threads": 2,
            "command": "python bench/bench_compare.py",
            "params": {"ours_organ": 100, "nnunet": 101, "nnunet_network": "ResidualEncoderUNet"},
        },  # fmt: skip
        "summary": summary,
        "ratios": bc.ratios(summary),
        "export": {
            "512 x 512 x 500": {
                "grid_zyx": [140, 446, 446],
                "runs": 3,
                "nnunet_s": 30.0,
                "ours_s": 2.0,
                "speedup": 15.0,
                "nnunet_rss_mb": 5000,
                "ours_rss_mb": 2000,
                "agreement": 0.97,
            }
        },  # fmt: skip
    }
    result["export"]["512 x 512 x 500, smooth-noise logits"] = dict(
        result["export"]["512 x 512 x 500"], logits="noise", speedup=4.0
    )
    g = bc.goals(result)
    assert any("worst case" in x and "4.0x" in x and "MISSED" not in x and "met" not in x for x in g)
    assert any("3.75x" in x and "(goal >= 3x): met" in x for x in g)
    # against nnU-Net as its users run it the goal is 10x: 130 / 12 = 10.83x met (torch), 130 / 6 = 21.67x met
    assert any("as its users run it" in x and "10.83x" in x and "(goal >= 10x): met" in x for x in g)
    assert any("2.93 GB" in x and "met" in x for x in g)
    assert any("15.0x" in x and "MISSED" in x for x in g)
    assert any("not the paper's" in x for x in g)  # tiny widths: said so
    result["goals"] = g
    md = bc.markdown(result)
    # each row: settings, widths, ROI (source and share kept), threads, runs of the median
    assert ("| 512 x 512 x 500 | ours (ROI + organ + tumor) | PyTorch eager fp32 | 4,8,16,16,16,16 | "
            "oracle box (phantom labels), 25 % of the volume | 2 | 3 | 12.0 |") in md  # fmt: skip
    assert "| ours, OpenVINO (the CPU default) | OpenVINO fp32 | 4,8,16,16,16,16 |" in md
    assert ("| nnU-Net v2 as its users run it (1 model) | PyTorch, step 0.5 (nnU-Net's default), Gaussian, mirroring z, y, x | "
            "4,8,16,16,16,16 | none (whole volume; nnU-Net crops to non-zero) | 2 | 1 | 130.0 |") in md  # fmt: skip
    assert "| nnU-Net v2 at our settings (1 model) | PyTorch, step 0.8 (= ours), Gaussian, no mirroring |" in md
    assert "| 512 x 512 x 500 | ours, OpenVINO (the CPU default) | 7.50x | 21.67x | not run |" in md
    assert "3.75x" in md and "97.00 %" in md and "140 x 446 x 446" in md and "python bench/bench_compare.py" in md


def test_rows_say_settings_and_roi():
    assert bc.row_settings("ours_int8", {"engine": "openvino", "precision": "int8"}).startswith("OpenVINO int8, calibrated")
    assert bc.row_settings("ours", {"engine": "torch", "precision": "bf16"}) == "PyTorch eager bf16"
    assert bc.row_roi("ours", {"roi": "model", "roi_weights": "trained", "crop_fraction": 0.4}) == (
        "ROI model (trained weights), 40 % of the volume"
    )
    assert bc.row_roi("monai", {}) == "none (whole volume)"
    equal = nn_side.predictor_settings("equal")
    assert bc.nnunet_settings_text(dict(equal, mirror_axes=[])) == "PyTorch, step 0.8 (= ours), Gaussian, no mirroring"
    default = nn_side.predictor_settings("default")
    assert bc.nnunet_settings_text(dict(default, mirror_axes=[0, 1, 2])) == (
        "PyTorch, step 0.5 (nnU-Net's default), Gaussian, mirroring z, y, x"
    )
    # mirroring asked but no axes allowed by the checkpoint: no mirroring, said so
    assert bc.nnunet_settings_text(dict(default, mirror_axes=[])).endswith("no mirroring")


def test_nnunet_predictor_settings():
    assert nn_side.predictor_settings("equal") == {
        "tile_step_size": pytest.approx(0.8),
        "use_gaussian": True,
        "use_mirroring": False,
    }
    assert nn_side.predictor_settings("default") == {"tile_step_size": 0.5, "use_gaussian": True, "use_mirroring": True}
    with pytest.raises(ValueError):
        nn_side.predictor_settings("fast")


def test_systems_repeats_and_interleaved_rounds():
    from flare23.errors import Flare23Error

    systems = bc.parse_systems("ours,ours_openvino,nnunet,nnunet_default,ours")
    assert systems == ["ours", "ours_openvino", "nnunet", "nnunet_default"]
    with pytest.raises(Flare23Error, match="nnunet_fast"):
        bc.parse_systems("ours,nnunet_fast")
    reps = bc.system_repeats(systems, 3, {"nnunet_default": 1})
    assert reps == {"ours": 3, "ours_openvino": 3, "nnunet": 3, "nnunet_default": 1}
    assert bc.system_repeats(["nnunet_default"], 2, {"nnunet_default": 5}) == {"nnunet_default": 2}  # never more rounds
    # round r: every system that has more than r runs, in the order given (interleaved)
    assert bc.round_systems(systems, 0, reps) == systems
    assert bc.round_systems(systems, 1, reps) == ["ours", "ours_openvino", "nnunet"]
    assert bc.round_systems(systems, 3, reps) == []
    assert [bc.base_system(s) for s in bc.SYSTEMS] == ["ours", "ours", "ours", "nnunet", "nnunet", "monai"]


def test_export_stage_without_noise_runs(tmp_path):
    """--noise_repeats 0: no noise row, nothing made or run for it (it used to look for export_noise/labels_nnunet.npy)."""
    made, ran = [], []

    def make_inputs(d, ed, kind):
        made.append(kind)
        ed.mkdir(parents=True, exist_ok=True)
        (ed / "logits.npy").write_bytes(b"x")
        return {"grid_zyx": [2, 3, 4]}

    def run_side(side, ed, case):
        ran.append((side, ed.name))
        labels = np.zeros((4, 5), np.uint8)
        if side == "ours":
            labels[:1] = 1  # 1 row of 4 differs: 75 % equal
        np.save(ed / f"labels_{side}.npy", labels)
        return {"seconds": {"nnunet": 8.0, "ours": 2.0}[side] + 0.5 * len(ran), "peak_rss_mb": {"nnunet": 900, "ours": 300}[side]}

    cases = {"512 x 512 x 40": tmp_path / "p40"}
    export = bc.export_stage(cases, ["organ", "noise"], {"organ": 2, "noise": 0}, run_side, make_inputs)
    assert list(export) == ["512 x 512 x 40, organ-like logits"] and made == ["organ"]
    assert [s for s, _ in ran] == ["nnunet", "ours", "nnunet", "ours"] and {e for _, e in ran} == {"export_organ"}
    e = export["512 x 512 x 40, organ-like logits"]
    # seconds: nnU-Net 8.5 and 9.5, ours 3.0 and 4.0 -> medians 9.0 / 3.5
    assert e["runs"] == 2 and e["nnunet_s"] == pytest.approx(9.0) and e["ours_s"] == pytest.approx(3.5)
    assert e["speedup"] == pytest.approx(9.0 / 3.5) and e["agreement"] == pytest.approx(0.75) and e["grid_zyx"] == [2, 3, 4]
    assert not (tmp_path / "p40" / "export_organ" / "logits.npy").exists()  # the large logits are not kept
    assert not (tmp_path / "p40" / "export_noise").exists()
    result = {"meta": {"hardware": "h", "device": "cpu", "filters": TINY, "command": "c", "params": {"ours_organ": 1}},
              "summary": {}, "ratios": {}, "export": export}  # fmt: skip
    assert "smooth-noise logits" not in bc.markdown(result) and "organ-like logits | 2 x 3 x 4 | 2 |" in bc.markdown(result)
    assert not any("worst case" in g for g in bc.goals(result))
    # both kinds with runs: both rows; no runs at all: no rows and nothing made
    made.clear()
    assert len(bc.export_stage(cases, ["organ", "noise"], {"organ": 1, "noise": 1}, run_side, make_inputs)) == 2
    made.clear()
    assert bc.export_stage(cases, ["organ", "noise"], {"organ": 0, "noise": 0}, run_side, make_inputs) == {} and made == []


def test_calibration_gets_the_timed_int8_runs_weights_and_widths(tmp_path):
    timed = bp.pipeline_overrides(tmp_path, TINY, "cpu", "openvino", "int8", str(tmp_path / "cal"), str(tmp_path / "cache"))
    cal = bc.calibration_overrides(tmp_path, TINY, "cpu", str(tmp_path / "cache"))
    # the same weights, widths, device and engine cache as the timed runs; nothing that calibrate refuses
    assert cal == {k: v for k, v in timed.items() if k not in ("engine", "precision", "int8_calibration")}
    assert not set(cal) & {"dataset_dir", "output_dir", "output_format", "precision", "int8_calibration", "engine"}
    assert cal["organ_ckpt"] == str(tmp_path / "organ.pt") and cal["tumor_ckpt"] == str(tmp_path / "tumor.pt")
    assert cal["organ_overrides"] == cal["tumor_overrides"] == {"network_def#filters": TINY}
    assert cal["engine_cache"] == str(tmp_path / "cache")
    assert (timed["engine"], timed["precision"], timed["int8_calibration"]) == ("openvino", "int8", str(tmp_path / "cal"))
    # the ROI weights: the trained extractor's where it has them, else the benchmark's (random) ones
    assert cal["roi_ckpt"] == str(bp.TRAINED_ROI if bp.TRAINED_ROI.is_file() else tmp_path / "roi.pt")


def test_roi_and_engine_choices():
    # the crop never depends on random ROI weights unless asked for
    assert bp.resolve_roi("auto", trained=False) == "oracle" and bp.resolve_roi("auto", trained=True) == "model"
    assert bp.resolve_roi("model", trained=False) == "model" and bp.resolve_roi("oracle", trained=True) == "oracle"
    with pytest.raises(ValueError):
        bp.resolve_roi("box", trained=False)
    assert bp.engine_overrides("torch", "auto") == {"engine": "torch", "precision": "auto"}
    assert bp.engine_overrides("openvino", "int8", "/cal", "/cache") == {
        "engine": "openvino", "precision": "int8", "int8_calibration": "/cal", "engine_cache": "/cache",
    }  # fmt: skip
    with pytest.raises(ValueError, match="calibration"):
        bp.engine_overrides("openvino", "int8")
    with pytest.raises(ValueError, match="OpenVINO"):
        bp.engine_overrides("torch", "int8", "/cal")
    assert {k: v[0] for k, v in bc.OURS.items()} == {"ours": "torch", "ours_openvino": "openvino", "ours_int8": "openvino"}


def test_memory_area_with_a_fake_sampler(monkeypatch):
    from flare23.efficiency import EfficiencyMonitor

    readings = iter([100.0, 300.0, 200.0, 50.0, 50.0, 50.0, 50.0, 50.0, 50.0, 50.0])
    monkeypatch.setattr(EfficiencyMonitor, "read_mb", lambda self: next(readings))
    result, mem = bc.measured(lambda: "done", device="cpu", interval=10.0)  # no sample in between: entry + exit
    assert result == "done"
    assert mem["peak_sampled_mb"] == 300.0 and mem["auc_mb_s"] == pytest.approx((100.0 + 300.0) * 10.0)
    assert mem["peak_torch_mb"] is None


def _nnunet(*args, timeout=900):
    env = {"nnUNet_def_n_proc": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(NNUNET_PY), str(ROOT / "bench" / "_nnunet_side.py"), *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


@pytest.fixture(scope="module")
def nnunet_model(tmp_path_factory):
    """nnU-Net's synthetic model folder for the tiny widths, built once (one nnU-Net process)."""
    folder = tmp_path_factory.mktemp("nnunet") / "m"
    built = _nnunet("build", "--model", folder, "--filters", ",".join(map(str, TINY)))
    return folder, built


@pytest.mark.slow
@needs_nnunet
def test_nnunet_network_size_matches_ours(nnunet_model):
    from flare23.bundles import SubBundle

    folder, built = nnunet_model
    ours = SubBundle(ROOT / "bundles" / "organ_seg", "inference.json", {"network_def#filters": TINY}).network()
    n_ours = sum(p.numel() for p in ours.parameters())
    assert built["network"] == "ResidualEncoderUNet" and built["heads"] == C.NUM_CLASSES
    assert abs(built["parameters"] - n_ours) / n_ours < 0.02
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    assert json.loads((folder / "plans.json").read_text()) == json.loads(json.dumps(nn_side.nnunet_plans(TINY)))


@pytest.mark.slow
@needs_nnunet
def test_default_settings_are_nnunets_own():
    """``predictor_settings("default")`` = the keyword defaults of the installed ``nnUNetPredictor`` (what its CLI uses)."""
    code = ("import inspect, json; from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor as P; "
            "print('RESULT ' + json.dumps({k: v.default for k, v in inspect.signature(P.__init__).parameters.items() "
            "if k in ('tile_step_size', 'use_gaussian', 'use_mirroring')}))")  # fmt: skip
    out = subprocess.run([str(NNUNET_PY), "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.split("RESULT ")[-1]) == nn_side.predictor_settings("default")


@pytest.mark.slow
@needs_nnunet
def test_both_exports_agree_on_a_tiny_input(nnunet_model, tmp_path):
    """Same logits to nnU-Net's export and to ours: identical labels where z is not resampled; close otherwise."""
    folder, _ = nnunet_model
    for name, grid, out_zyx in (("same_z", (12, 30, 34), (12, 48, 56)), ("z_up", (8, 30, 34), (20, 48, 56))):
        work = tmp_path / name
        work.mkdir()
        logits = bc.smooth_logits(C.NUM_CLASSES, grid, seed=4, coarse=4).half()
        np.save(work / "logits.npy", logits.numpy())
        spacing = [2.5 * g / o for g, o in zip(grid, out_zyx)]
        (work / "geometry.json").write_text(json.dumps({"shape_zyx": list(out_zyx), "spacing_zyx": spacing}))
        _nnunet("export", "--model", folder, "--work", work, "--threads", "1")
        theirs = np.load(work / "labels_nnunet.npy")
        bc.worker_export_ours(type("A", (), {"work": str(work), "threads": 1})())
        ours = np.load(work / "labels_ours.npy")
        assert ours.shape == theirs.shape == out_zyx
        # independent reference: torch trilinear of the same logits, arg-max
        ref = F.interpolate(logits.float()[None], size=out_zyx, mode="trilinear", align_corners=False)[0].argmax(0).numpy()
        assert (ours == ref).mean() > 0.999
        agreement = (ours == theirs).mean()
        if name == "same_z":
            assert agreement > 0.995  # both are bilinear in-plane with the same voxel-centre convention
        else:
            assert agreement > 0.8  # nnU-Net: nearest along z (order_z 0, anisotropic spacing); ours: linear


def test_organ_logits_are_the_labels_on_the_model_grid():
    """Organ-like logits: arg-max = the labels where no resampling happens; on a coarser grid, = nearest labels inside organs."""
    label = np.zeros((24, 20, 12), np.uint8)  # x, y, z
    label[2:14, 3:15, 2:9] = 1
    label[14:22, 5:12, 4:11] = 6
    label[5:8, 14:18, 1:5] = 14
    logits = bc.organ_logits(label, (12, 20, 24), 15, seed=1)
    assert logits.dtype == torch.float16 and tuple(logits.shape) == (15, 12, 20, 24)
    assert np.array_equal(logits.float().argmax(0).numpy().transpose(2, 1, 0), label)
    # the noise part is smooth_logits' noise (built one class at a time to bound memory)
    noise_only = bc.organ_logits(label, (12, 20, 24), 15, seed=1, scale=0.0)
    torch.testing.assert_close(noise_only, (0.25 * bc.smooth_logits(15, (12, 20, 24), seed=1)).half(), atol=0, rtol=0)
    # half the in-plane resolution: every voxel whose 2 x 2 source block is one class keeps it
    coarse = bc.organ_logits(label, (12, 10, 12), 15, seed=1).float().argmax(0).numpy().transpose(2, 1, 0)
    blocks = label.reshape(12, 2, 10, 2, 12)
    uniform = blocks.min(axis=(1, 3)) == blocks.max(axis=(1, 3))
    assert uniform.mean() > 0.7
    assert np.array_equal(coarse[uniform], blocks[:, 0, :, 0, :][uniform])
