"""A trained model carries its settings (issue 21, item 1): train the three bundles tiny, segment with the checkpoints alone.

The three trainings go through ``python -m monai.bundle run training --device cpu`` with widths, spacings,
patch sizes and an ROI slice spacing that all differ from the bundles' defaults. Segmenting with the three
checkpoints and no other option must give the labels of the run that states every setting by hand (with
checkpoints stripped of their settings, as before bundles 0.7); a contradicting override must stop in one
line with exit 2, before any work.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from flare23.errors import Flare23Error
from flare23.inference.weights import weights_files
from flare23.models.spec import build_network, network_spec, same
from flare23.models.trained import RecordedSettings, TrainedSettings, read_settings, trained_network

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
EPOCH = {"max_epochs": 1, "epoch_length": 1, "val_interval": 1, "num_workers": 0, "device": "cpu"}
#: every value differs from the bundle's default
TRAINING = {
    "roi_extractor": {"network_def#filters": [4, 8, 8, 8, 8], "patch_size": [32, 32, 16], "slice_target_mm": 6.0},
    "organ_seg": {"network_def#filters": [4, 8, 8, 8, 8, 8], "target_spacing": [5.0, 5.0, 8.0], "patch_size": [64, 64, 16],
                  "batch_size": 2, "sw_batch_size": 1, "show_progress": False},
    "tumor_seg": {"network_def#filters": [4, 8, 8, 8, 8, 4], "target_spacing": [6.0, 6.0, 8.0], "patch_size": [64, 64, 8],
                  "batch_size": 2, "sw_batch_size": 1, "show_progress": False},
}  # fmt: skip
#: what the same inference needs by hand when the checkpoints carry nothing
BY_HAND = {
    "roi_overrides": {"network_def#filters": [4, 8, 8, 8, 8], "slice_target_mm": 6.0},
    "organ_overrides": {"network_def#filters": [4, 8, 8, 8, 8, 8], "target_spacing": [5.0, 5.0, 8.0], "patch_size": [64, 64, 16]},
    "tumor_overrides": {"network_def#filters": [4, 8, 8, 8, 8, 4], "target_spacing": [6.0, 6.0, 8.0], "patch_size": [64, 64, 8]},
}
PART = {"roi_extractor": "roi", "organ_seg": "organ", "tumor_seg": "tumor"}


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)  # the old-checkpoint warning is asserted
    return env


def _arg(value) -> str:
    return value if isinstance(value, str) else str(value) if isinstance(value, bool) else json.dumps(value)


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Phantoms, the three tiny trainings (subprocesses, ``--device cpu``) and one input case."""
    from flare23.tools.phantoms.generate import generate_phantoms, make_phantom

    work = tmp_path_factory.mktemp("trained_settings")
    data = work / "phantoms"
    generate_phantoms(data, cases=4, seed=0, size="tiny", tumor_fraction=0.7)
    ckpts = {}
    for bundle, overrides in TRAINING.items():
        out = work / bundle
        args = {**EPOCH, **overrides, "bundle_root": str(BUNDLES / bundle), "dataset_dir": str(data),
                "ckpt_dir": str(out / "models"), "output_dir": str(out / "runs")}  # fmt: skip
        cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(BUNDLES / bundle / "configs" / "train.json")]
        for key, value in args.items():
            cmd += [f"--{key}", _arg(value)]
        proc = _run(cmd, work)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        ckpts[bundle] = out / "models" / "model.pt"
    inputs = work / "inputs"
    inputs.mkdir()
    case = make_phantom(7, size="tiny", orientation="LPS")
    nib.save(nib.Nifti1Image(case["image"], case["affine"]), str(inputs / "case_0000.nii.gz"))
    return {"work": work, "data": data, "ckpt": ckpts, "inputs": inputs}


def segment(trained, out: Path, *extra: str, ckpts: dict | None = None) -> subprocess.CompletedProcess:
    ckpts = ckpts or trained["ckpt"]
    cmd = [sys.executable, "-m", "flare23", "segment", "-i", str(trained["inputs"]), "-o", str(out), "--precision", "fp32",
           "--roi_ckpt", str(ckpts["roi_extractor"]), "--organ_ckpt", str(ckpts["organ_seg"]), "--tumor_ckpt", str(ckpts["tumor_seg"]),
           *extra]  # fmt: skip
    return _run(cmd, trained["work"])


def labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def strip_settings(ckpts: dict, folder: Path) -> dict:
    """Copies of the checkpoints as written before bundles 0.7: the state dict alone."""
    folder.mkdir(exist_ok=True)
    out = {}
    for bundle, path in ckpts.items():
        out[bundle] = folder / f"{bundle}.pt"
        torch.save(torch.load(path, weights_only=True)["model"], out[bundle])
    return out


# --- what the checkpoints hold -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bundle", list(TRAINING))
def test_every_checkpoint_of_a_training_carries_the_settings_it_was_trained_with(trained, bundle):
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    folder = trained["ckpt"][bundle].parent
    for path in (folder / "model.pt", folder / "checkpoint_epoch=1.pt"):
        state = torch.load(path, weights_only=True)  # plain containers only
        settings = state["settings"]
        assert settings["bundle"] == meta["name"] and settings["version"] == meta["version"]
        assert settings["model"] == PART[bundle]
        assert settings["labels"] == meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        values = settings["values"]
        for key, value in TRAINING[bundle].items():
            if key == "network_def#filters":
                assert settings["network"]["filters"] == value
            elif key in values:
                assert same(values[key], value), key
        # the recorded definition rebuilds a network the weights load into strictly
        net = build_network(settings["network"])
        net.load_state_dict(state["model"], strict=True)
    if bundle == "roi_extractor":
        assert set(values) == {"inplane_stride", "slice_target_mm", "clip"}
    else:
        assert set(values) == {"target_spacing", "patch_size", "overlap", "normalization"}
        assert set(values["normalization"]) == {"clip_low", "clip_high", "mean", "std"}


# --- the pipeline with the checkpoints alone ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def by_hand(trained) -> np.ndarray:
    """Labels of the run with settings-free checkpoints and every setting given by hand (the old way)."""
    bare = strip_settings(trained["ckpt"], trained["work"] / "bare")
    extra = []
    for key, value in BY_HAND.items():
        extra += [f"--{key}", json.dumps(value)]
    proc = segment(trained, trained["work"] / "by_hand", *extra, ckpts=bare)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "records no settings" in proc.stderr  # the one-line warning for an old checkpoint
    return labels(trained["work"] / "by_hand" / "case.nii.gz")


def test_segment_with_the_three_checkpoints_alone_equals_the_run_with_every_override_by_hand(trained, by_hand, tmp_path):
    proc = segment(trained, tmp_path / "alone")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "flare23: warning" not in proc.stderr
    alone = labels(tmp_path / "alone" / "case.nii.gz")
    assert len(np.unique(alone)) > 2  # the tiny models found organs: the comparison below is not between empty maps
    assert alone.shape == by_hand.shape and np.array_equal(alone, by_hand)
    # the same overrides given again agree with the checkpoints, so they are accepted and change nothing
    extra = [a for key, value in BY_HAND.items() for a in (f"--{key}", json.dumps(value))]
    proc = segment(trained, tmp_path / "again", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(labels(tmp_path / "again" / "case.nii.gz"), by_hand)


def test_a_packed_pipeline_checkpoint_carries_the_three_settings(trained, by_hand, tmp_path):
    packed = tmp_path / "pipeline.pt"
    ck = trained["ckpt"]
    cmd = [sys.executable, "-m", "flare23", "pack", "--out", str(packed), "--roi_ckpt", str(ck["roi_extractor"]),
           "--organ_ckpt", str(ck["organ_seg"]), "--tumor_ckpt", str(ck["tumor_seg"])]  # fmt: skip
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(packed, weights_only=True)
    assert sorted(state["settings"]["parts"]) == ["organ", "roi", "tumor"]
    assert read_settings(packed, "tumor")["values"]["patch_size"] == [64, 64, 8]
    missing = {b: tmp_path / "absent.pt" for b in ck}
    proc = segment(trained, tmp_path / "packed", "--combined_ckpt", str(packed), ckpts=missing)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(labels(tmp_path / "packed" / "case.nii.gz"), by_hand)


@pytest.mark.parametrize(
    "extra, names",
    [
        (["--organ_overrides", "{'target_spacing': [3.0, 3.0, 3.0]}"], ("target_spacing", "[5.0, 5.0, 8.0]", "[3.0, 3.0, 3.0]")),
        (["--tumor_overrides", "{'patch_size': [64, 64, 16]}"], ("patch_size", "[64, 64, 8]", "[64, 64, 16]")),
        (["--organ_overrides", "{'network_def#filters': [8, 8, 8, 8, 8, 8]}"], ("network_def#filters", "[4, 8, 8, 8, 8, 8]")),
        (["--roi_overrides", "{'slice_target_mm': 5.0}"], ("slice_target_mm", "6.0", "5.0")),
        (["--organ_overrides", "{'fingerprint_file': 'FP'}"], ("normalization",)),
        (["--organ_ckpt", "TUMOR"], ("tumor model", "not the organ model")),
    ],
)
def test_a_contradicting_setting_exits_2_in_one_line_before_any_work(trained, tmp_path, extra, names):
    fingerprint = tmp_path / "fp.json"
    fingerprint.write_text(json.dumps({"organ": {"clip_low": -100.0, "clip_high": 200.0, "mean": 50.0, "std": 60.0}}))
    ckpts = dict(trained["ckpt"])
    if extra[0] == "--organ_ckpt":  # the tumor model given as the organ model
        ckpts["organ_seg"], extra = trained["ckpt"]["tumor_seg"], []
    extra = [a.replace("FP", str(fingerprint)) for a in extra]
    out = tmp_path / "out"
    proc = segment(trained, out, *extra, ckpts=ckpts)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("flare23: error:")]
    assert len(errors) == 1, proc.stderr
    assert all(n in errors[0] for n in names), errors[0]
    assert "Traceback" not in proc.stderr
    assert not list(out.glob("*.nii.gz"))


def test_an_old_checkpoint_of_other_widths_without_overrides_is_one_line_not_a_wrong_answer(trained, tmp_path):
    bare = strip_settings(trained["ckpt"], tmp_path / "bare")
    proc = segment(trained, tmp_path / "out", ckpts=bare)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("flare23: error:")]
    assert len(errors) == 1 and "do not match the network" in errors[0], proc.stderr
    assert not list((tmp_path / "out").glob("*.nii.gz"))


# --- each bundle's own configs --------------------------------------------------------------------------------------
def _workflow(bundle: str, files: list[str], **overrides):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=[str(BUNDLES / bundle / "configs" / f) for f in files],
        workflow_type="infer",
        logging_file=False,
        bundle_root=str(BUNDLES / bundle),
        **overrides,
    )


def test_the_fine_bundles_own_inference_config_builds_the_trained_network_and_preprocessing(trained, tmp_path):
    ckpt = trained["ckpt"]["tumor_seg"]
    stored = torch.load(ckpt, weights_only=True)["settings"]
    wf = _workflow("tumor_seg", ["inference.json"], ckpt_path=str(ckpt), dataset_dir=str(trained["inputs"]),
                   output_dir=str(tmp_path / "out"), device="cpu", num_workers=0)  # fmt: skip
    wf.initialize()
    p = wf.parser
    net = p.get_parsed_content("network_def")
    # the trained network, without the deep-supervision heads it trained with (inference never uses them)
    assert stored["network"]["deep_supervision"] is True and not hasattr(net, "deep_supervision_heads")
    assert network_spec(net) == {**stored["network"], "deep_supervision": False}
    assert p.get_parsed_content("target_spacing") == [6.0, 6.0, 8.0]
    assert p.get_parsed_content("patch_size") == [64, 64, 8]
    assert p.get_parsed_content("normalization") == stored["values"]["normalization"]
    spacing = next(t for t in p.get_parsed_content("preprocessing").transforms if type(t).__name__ == "ResampleToSpacingd")
    assert np.allclose(spacing.resamplers["image"].pixdim, [6.0, 6.0, 8.0])
    assert list(p.get_parsed_content("inferer").roi_size) == [64, 64, 8]
    wf.run()
    out = labels(tmp_path / "out" / "case.nii.gz")
    assert out.shape == labels_shape(trained)
    # a contradicting override is refused by the config's own check
    wf = _workflow("tumor_seg", ["inference.json"], ckpt_path=str(ckpt), patch_size=[32, 32, 8], device="cpu")
    raises_cause(r"patch_size: .* was trained with \[64, 64, 8\], but this run sets \[32, 32, 8\]", wf.initialize)


def raises_cause(pattern: str, call) -> None:
    """``call()`` fails with a :class:`Flare23Error` (MONAI's parser wraps it) whose message matches ``pattern``."""
    from flare23.bundles import user_error_in

    with pytest.raises(Exception) as info:
        call()
    cause = user_error_in(info.value)
    assert cause is not None and re.search(pattern, str(cause)), repr(info.value)


def labels_shape(trained) -> tuple:
    return nib.load(str(trained["inputs"] / "case_0000.nii.gz")).shape


def test_the_roi_bundles_inference_config_reads_its_subsampling_from_the_checkpoint(trained):
    wf = _workflow("roi_extractor", ["inference.json"], ckpt_path=str(trained["ckpt"]["roi_extractor"]), device="cpu")
    assert wf.parser.get_parsed_content("slice_target_mm") == 6.0
    assert wf.parser.get_parsed_content("network_def").filters == (4, 8, 8, 8, 8)


def test_evaluate_mixin_names_the_settings_to_pass(trained):
    bundle = "organ_seg"
    ckpt_dir = trained["ckpt"][bundle].parent
    wf = _workflow(bundle, ["train.json", "evaluate.json"], ckpt_dir=str(ckpt_dir), dataset_dir=str(trained["data"]), device="cpu")
    raises_cause(r"target_spacing: .*; pass --target_spacing \[5.0, 5.0, 8.0\]", wf.initialize)
    wf = _workflow(bundle, ["train.json", "evaluate.json"], ckpt_dir=str(ckpt_dir), dataset_dir=str(trained["data"]), device="cpu",
                   target_spacing=[5.0, 5.0, 8.0], patch_size=[64, 64, 16])  # fmt: skip
    raises_cause(r"network_def#filters: .*; pass --network_def#filters \[4, 8, 8, 8, 8, 8\]", wf.initialize)


def test_resume_refuses_a_run_whose_settings_contradict_the_checkpoint(trained):
    state = torch.load(trained["ckpt"]["organ_seg"], weights_only=True)["settings"]
    net = build_network(state["network"])
    same_run = RecordedSettings(BUNDLES / "organ_seg", "organ", net, state["values"])
    same_run.load_state_dict(state)  # the run that wrote it: accepted
    other = RecordedSettings(BUNDLES / "organ_seg", "organ", net, {**state["values"], "patch_size": [64, 64, 32]})
    with pytest.raises(Flare23Error, match=r"cannot resume: the checkpoint was trained with patch_size \[64, 64, 16\]"):
        other.load_state_dict(state)
    wider = build_network({**state["network"], "filters": [8, 8, 8, 8, 8, 8]})
    with pytest.raises(Flare23Error, match=r"network_def#filters \[4, 8, 8, 8, 8, 8\], this run has \[8, 8, 8, 8, 8, 8\]"):
        RecordedSettings(BUNDLES / "organ_seg", "organ", wider, state["values"]).load_state_dict(state)


# --- units --------------------------------------------------------------------------------------------------------------
def test_network_spec_round_trips_the_three_network_classes_and_refuses_what_it_cannot_prove():
    from monai.networks.nets import DynUNet

    from flare23.models.networks import LightUNet, NnDynUNet

    k, s = [[3, 3, 1], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [2, 2, 1], [2, 2, 2]]
    nets = [
        DynUNet(3, 1, 15, k, s, s[1:], filters=[4, 8, 16], norm_name=("INSTANCE", {"affine": True}), res_block=True),
        NnDynUNet(3, 1, 15, k, s, s[1:], filters=[4, 8, 16], deep_supervision=True, deep_supr_num=1),
        LightUNet(filters=[4, 8, 8], encoder_depths=[1, 2, 2], strides=[1, 2, 2]),
    ]
    for net in nets:
        spec = network_spec(net)
        assert spec is not None and json.loads(json.dumps(spec)) == spec  # plain, JSON-able
        rebuilt = build_network(spec)
        assert type(rebuilt) is type(net) and repr(rebuilt) == repr(net)
        rebuilt.load_state_dict(net.state_dict(), strict=True)
    assert network_spec(nets[0])["res_block"] is True

    class Hidden(torch.nn.Module):  # keeps its width nowhere: the round trip fails, nothing is claimed
        def __init__(self, width: int = 3):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, width, 3)

    assert network_spec(Hidden(5)) is None
    with pytest.warns(UserWarning, match="cannot be recorded"):
        RecordedSettings(BUNDLES / "organ_seg", "organ", Hidden(5), {})


def test_trained_network_without_settings_is_the_plain_class_and_weights_files_prefer_the_three(tmp_path):
    net = trained_network(None, "flare23.models.networks.LightUNet", filters=[4, 8], encoder_depths=[1, 1], strides=[1, 2])
    assert net.filters == (4, 8)
    empty = TrainedSettings(None)
    assert empty.get("patch_size", [1, 2, 3]) == [1, 2, 3] and empty.settings is None
    empty.check(patch_size=[9, 9, 9])  # nothing stored: nothing to contradict
    files = {n: tmp_path / f"{n}.pt" for n in ("roi", "organ", "tumor", "combined")}
    files["combined"].write_bytes(b"x")
    assert weights_files(*(files[n] for n in ("roi", "organ", "tumor", "combined"))) == dict.fromkeys(
        ("roi", "organ", "tumor"), str(files["combined"])
    )
    for n in ("roi", "organ", "tumor"):
        files[n].write_bytes(b"x")
    assert weights_files(*(files[n] for n in ("roi", "organ", "tumor", "combined")))["organ"] == str(files["organ"])


def test_settings_compare_numbers_by_value_and_containers_element_by_element():
    assert same([4, 4, 5], [4.0, 4.0, 5.0]) and same({"a": (1, 2)}, {"a": [1, 2]})
    assert not same([4, 4, 5], [4, 4, 5.1]) and not same([1, 2], [1, 2, 3]) and not same(True, 1)
    assert not same({"a": 1}, {"a": 1, "b": 2}) and same(None, None) and not same("x", "y")


def test_inference_without_the_heads_is_the_trained_network_and_any_other_difference_is_refused(tmp_path):
    """The fine models train with deep supervision and infer without it: not a mismatch; every other difference still is."""
    from monai.bundle import ConfigParser

    from flare23.training.checkpoints import load_weights

    tiny = [4, 8, 8, 8, 8, 8]

    def parsed(ckpt, **overrides):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / "organ_seg" / "configs" / "inference.json"))
        parser["bundle_root"] = str(BUNDLES / "organ_seg")
        parser["ckpt_path"] = str(ckpt)
        for key, value in overrides.items():
            parser[key] = value
        return parser

    def checkpoint(name: str, heads: bool):
        net = parsed("", **{"network_def#filters": tiny, "network_def#deep_supervision": heads}).get_parsed_content("network_def")
        path = tmp_path / name
        torch.save({"model": net.state_dict(), "settings": RecordedSettings(BUNDLES / "organ_seg", "organ", net, {}).state_dict()}, path)
        return net.eval(), path

    trained, ckpt = checkpoint("heads.pt", heads=True)
    assert torch.load(ckpt, weights_only=True)["settings"]["network"]["deep_supervision"] is True
    x = torch.randn(1, 1, 64, 64, 32)
    for overrides in ({}, {"network_def#filters": tiny}):  # the stored definition by default, or the same given explicitly
        parser = parsed(ckpt, **overrides)
        net = parser.get_parsed_content("network_def")
        assert list(net.filters) == tiny and not net.deep_supervision and not hasattr(net, "deep_supervision_heads")
        parser.get_parsed_content("trained").check_network(net)  # evaluate.json's check accepts it too
        with torch.no_grad():
            assert torch.equal(load_weights(net, ckpt).eval()(x), trained(x))
    # a training's recorded class (NativeHeadsDynUNet: DynUNet's network, other training outputs) is built on both routes,
    # so the plain command and a run that repeats the overrides (the quickstart's) build one network, not two classes
    from flare23.models.networks import NativeHeadsDynUNet
    from flare23.models.spec import build_network

    spec = torch.load(ckpt, weights_only=True)["settings"]["network"]
    native = build_network({**spec, "_target_": "flare23.models.networks.NativeHeadsDynUNet"})
    native_ckpt = tmp_path / "native.pt"
    torch.save({"model": native.state_dict(), "settings": RecordedSettings(BUNDLES / "organ_seg", "organ", native, {}).state_dict()},
               native_ckpt)  # fmt: skip
    assert torch.load(native_ckpt, weights_only=True)["settings"]["network"]["_target_"].endswith("NativeHeadsDynUNet")
    built = [parsed(native_ckpt, **o).get_parsed_content("network_def") for o in ({}, {"network_def#filters": tiny})]
    assert [type(n) for n in built] == [NativeHeadsDynUNet, NativeHeadsDynUNet]
    wider = parsed(ckpt, **{"network_def#filters": [8, 8, 8, 8, 8, 8]})
    raises_cause(r"network_def#filters: .* was trained with \[4, 8, 8, 8, 8, 8\], but this run sets \[8, 8, 8, 8, 8, 8\]",
                 lambda: wider.get_parsed_content("network_def"))  # fmt: skip
    other_heads = parsed(ckpt, **{"network_def#filters": tiny, "network_def#deep_supervision": True, "network_def#deep_supr_num": 2})
    raises_cause(r"network_def#deep_supr_num: .* was trained with 3, but this run sets 2", lambda: other_heads.get_parsed_content("network_def"))
    # heads that the training did not have are not the trained network
    _, bare = checkpoint("bare.pt", heads=False)
    with_heads = parsed(bare, **{"network_def#filters": tiny, "network_def#deep_supervision": True})
    raises_cause(r"network_def#deep_supervision: .* was trained with False, but this run sets True",
                 lambda: with_heads.get_parsed_content("network_def"))  # fmt: skip
    # a resumed training compares the heads strictly
    state = torch.load(ckpt, weights_only=True)["settings"]
    no_heads = RecordedSettings(BUNDLES / "organ_seg", "organ", parsed(ckpt).get_parsed_content("network_def"), {})
    with pytest.raises(Flare23Error, match=r"cannot resume: the checkpoint was trained with network_def#deep_supervision True"):
        no_heads.load_state_dict(state)


def test_native_heads_dynunet_is_dynunets_network_for_resume_fine_tuning_and_inference():
    """A 0.8.x checkpoint (DynUNet) resumes under the 0.9 training network (NativeHeadsDynUNet) and back; other classes still differ."""
    from monai.networks.nets import DynUNet

    from flare23.models.networks import NativeHeadsDynUNet, NnDynUNet
    from flare23.models.spec import network_difference

    k, s = [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [2, 2, 1], [2, 2, 2]]
    args = dict(filters=[4, 8, 16], deep_supervision=True, deep_supr_num=1, res_block=True)
    old, new, nn = (cls(3, 1, 15, k, s, s[1:], **args) for cls in (DynUNet, NativeHeadsDynUNet, NnDynUNet))
    old_spec, new_spec, nn_spec = network_spec(old), network_spec(new), network_spec(nn)
    assert old_spec["_target_"] != new_spec["_target_"]
    assert network_difference(old_spec, new_spec) is None and network_difference(new_spec, old_spec) is None
    state = RecordedSettings(BUNDLES / "organ_seg", "organ", old, {}).state_dict()
    RecordedSettings(BUNDLES / "organ_seg", "organ", new, {}).load_state_dict(state)  # resume: accepted
    new.load_state_dict(old.state_dict(), strict=True)
    # nnU-Net's kernels are another network (other weight shapes): still refused by name
    assert network_difference(old_spec, nn_spec)[0] == "network_def#_target_"
    with pytest.raises(Flare23Error, match=r"cannot resume: the checkpoint was trained with network_def#_target_"):
        RecordedSettings(BUNDLES / "organ_seg", "organ", nn, {}).load_state_dict(state)
