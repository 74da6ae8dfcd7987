"""The organ_seg and tumor_seg bundles: tiny trainings, resume, evaluation, inference geometry, config contract.

Every run writes under ``tmp_path``; networks and patches are tiny (``TINY``). The two trainings
go through ``python -m monai.bundle run training`` in a subprocess, the other runs use
``monai.bundle.ConfigWorkflow`` in this process (same parser, no second start-up).
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch

from flare23 import constants as C
from flare23.errors import Flare23Error
from flare23.tools.phantoms.generate import generate_phantoms
from flare23.training.checkpoints import latest_checkpoint

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas"
BUNDLES = ("organ_seg", "tumor_seg")
MODEL = {"organ_seg": "organ", "tumor_seg": "tumor"}
KEY_METRIC = {"organ_seg": "val_mean_organ_dsc", "tumor_seg": "val_tumor_dsc"}

#: tiny phantoms are about 5.3 x 5.3 x 8.5 mm; 6-stage networks need 32 x 32 x 16 (organ) / 8 (tumor) multiples
TINY = {
    "organ_seg": {"patch_size": [64, 64, 16]},
    "tumor_seg": {"patch_size": [64, 64, 8]},
}
COMMON = {"target_spacing": [5.0, 5.0, 8.0], "network_def#filters": [4, 8, 8, 8, 8, 8], "num_workers": 0, "sw_batch_size": 1}
TRAIN = {"max_epochs": 2, "epoch_length": 1, "val_interval": 1, "batch_size": 2, "show_progress": False}


def configs(bundle: str) -> Path:
    return ROOT / "bundles" / bundle / "configs"


def tiny(bundle: str, **extra) -> dict:
    return {**COMMON, **TINY[bundle], **extra}


def cli_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else str(value) if isinstance(value, bool) else json.dumps(value)
        args += [f"--{key}", text]  # fire reads True / False, not JSON's true / false
    return args


def workflow(bundle: str, files: list[str], workflow_type: str, **overrides):
    from monai.bundle import ConfigWorkflow

    paths = [str(configs(bundle) / f) for f in files]
    return ConfigWorkflow(
        config_file=paths if len(paths) > 1 else paths[0],
        workflow_type=workflow_type,
        meta_file=str(configs(bundle) / "metadata.json"),
        logging_file=str(configs(bundle) / "logging.conf"),
        bundle_root=str(ROOT / "bundles" / bundle),
        **overrides,
    )


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("fine_phantoms")
    generate_phantoms(out, cases=6, seed=0, size="tiny", tumor_fraction=0.7)
    return out


@pytest.fixture(scope="module", params=BUNDLES)
def trained(request, phantoms, tmp_path_factory):
    """A 2-epoch tiny training through ``python -m monai.bundle run training`` (subprocess)."""
    bundle = request.param
    work = tmp_path_factory.mktemp(f"train_{bundle}")
    overrides = tiny(bundle, **TRAIN, dataset_dir=str(phantoms), ckpt_dir=str(work / "models"), output_dir=str(work / "runs"))
    overrides["bundle_root"] = str(ROOT / "bundles" / bundle)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(configs(bundle) / "train.json")]
    cmd += ["--meta_file", str(configs(bundle) / "metadata.json"), "--logging_file", str(configs(bundle) / "logging.conf")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd + cli_args(overrides), cwd=work, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return {"bundle": bundle, "dir": work, "ckpt_dir": work / "models", "output_dir": work / "runs", "log": log, "data": phantoms}


# --- training through the CLI -------------------------------------------------------------------------------------


def test_training_cli_writes_checkpoints_logs_and_best_model(trained):
    bundle, ckpt_dir = trained["bundle"], trained["ckpt_dir"]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint_epoch=2.pt", "model.pt"]
    state = torch.load(ckpt_dir / "checkpoint_epoch=2.pt", weights_only=True)
    assert set(state) == {"model", "optimizer", "lr_scheduler", "trainer", "best_model", "settings"}
    assert state["trainer"]["iteration"] == 2 and state["trainer"]["epoch_length"] == 1
    assert state["lr_scheduler"]["last_epoch"] == 2
    assert state["optimizer"]["param_groups"][0]["momentum"] == C.MOMENTUM
    assert state["optimizer"]["param_groups"][0]["nesterov"] is True
    # poly decay per epoch: after epoch 1 of 2 the lr is 0.01 * (1 - 1/2) ** 0.9
    lrs = [float(x) for x in re.findall(r"Current learning rate: ([0-9.e-]+)", trained["log"])]
    assert lrs and lrs[0] == pytest.approx(C.LEARNING_RATE * (1 - 1 / 2) ** C.POLY_POWER, rel=1e-4)
    # key metric in the log, best model = state dict of the network that loads strictly, and the settings
    assert re.search(rf"Key metric: {KEY_METRIC[bundle]} best value", trained["log"])
    best = torch.load(ckpt_dir / "model.pt", weights_only=True)
    assert set(best) == {"model", "settings"} and all(isinstance(v, torch.Tensor) for v in best["model"].values())
    assert best["settings"]["values"]["patch_size"] == TINY[bundle]["patch_size"]
    from flare23.training.checkpoints import load_weights

    net = workflow(bundle, ["inference.json"], "infer", **tiny(bundle)).parser.get_parsed_content("network_def")
    load_weights(net, ckpt_dir / "model.pt")
    assert list(trained["output_dir"].glob("events.out.tfevents.*"))  # TensorBoard


def test_resume_from_last_checkpoint(trained, tmp_path):
    bundle = trained["bundle"]
    ckpt_dir = tmp_path / "models"
    shutil.copytree(trained["ckpt_dir"], ckpt_dir)
    wf = workflow(
        bundle, ["train.json"], "train",
        **tiny(bundle, **TRAIN, dataset_dir=str(trained["data"]), ckpt_dir=str(ckpt_dir), output_dir=str(tmp_path / "runs")),
    )  # fmt: skip
    wf.parser["max_epochs"] = 3
    wf.initialize()
    wf.run()
    resume = wf.parser.get_parsed_content("train#checkpoint_handlers#0")
    assert resume.loaded_from == ckpt_dir / "checkpoint_epoch=2.pt"
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 3 and trainer.state.iteration == 3  # one more epoch, not three
    # the new saver writes epoch 3 (the resumed-from file stays: MONAI's saver only rotates its own files)
    assert latest_checkpoint(ckpt_dir) == ckpt_dir / "checkpoint_epoch=3.pt"
    assert torch.load(ckpt_dir / "checkpoint_epoch=3.pt", weights_only=True)["trainer"]["iteration"] == 3
    wf.finalize()


def test_time_budget_shortens_the_run_and_completes_the_poly_decay(phantoms, tmp_path):
    """--time_budget_s through the config: a budget already spent after epoch 2 leaves one more epoch, lr -> 0."""
    from flare23.training.resume import TimeBudget

    bundle = "tumor_seg"
    over = tiny(bundle, **TRAIN, dataset_dir=str(phantoms), ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"))
    wf = workflow(bundle, ["train.json"], "train", **{**over, "max_epochs": 6, "time_budget_s": 0.001})
    wf.initialize()
    budget = [h for h in wf.parser.get_parsed_content("train#handlers") if isinstance(h, TimeBudget)]
    sched = wf.parser.get_parsed_content("lr_scheduler")
    assert len(budget) == 1 and budget[0].budget_s == 0.001 and budget[0].lr_scheduler is sched
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 3 and budget[0].fitted_epochs == 3
    assert sched.total_iters == 3 and sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    wf.finalize()
    # default: no budget, nothing attached (the configured max_epochs rule)
    assert workflow(bundle, ["train.json"], "train", **over).parser.get_parsed_content("time_budget_s") == 0


@pytest.mark.parametrize("bundle", BUNDLES)
def test_lesion_balanced_sampling_is_wired_through_the_config(bundle, phantoms, tmp_path):
    """``crop_balance_classes``: cached per-voxel weights, filtered by the context crop, used and dropped by the sampler."""
    from monai.transforms import Compose
    from skimage.measure import label as components

    from flare23.models.sampling import ClassComponentWeightsd, RandCropByLabelClassesFallbackd, RandRoiContextCropd

    over = tiny(bundle, **TRAIN, dataset_dir=str(phantoms), ckpt_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "r"))
    off = workflow(bundle, ["train.json"], "train", **over).parser
    assert off.get_parsed_content("crop_balance_classes") == []  # default: MONAI's voxel-uniform centres
    parser = workflow(
        bundle, ["train.json"], "train", **{**over, "crop_balance_classes": [C.TUMOR_ID], "crop_balance_power": 0.5}
    ).parser
    det = parser.get_parsed_content("train#deterministic_transforms")
    rnd = parser.get_parsed_content("train#random_transforms")
    balance = [t for t in det if isinstance(t, ClassComponentWeightsd)]
    assert len(balance) == 1 and balance[0].classes == [C.TUMOR_ID] and balance[0].power == 0.5
    keys = {type(t): t.weights_key for t in rnd if isinstance(t, (RandRoiContextCropd, RandCropByLabelClassesFallbackd))}
    assert set(keys.values()) == {balance[0].weights_key} and len(keys) == 2
    datalist = parser.get_parsed_content("train#datalist")
    cases = [Compose(det)(dict(e)) for e in datalist]
    with_tumor = [c for c in cases if len(c["label_cls_indices"][C.TUMOR_ID])]
    assert with_tumor, "the tiny phantoms should hold tumors"
    for c in with_tumor:
        w, ix = c["label_cls_weights"][C.TUMOR_ID], np.asarray(c["label_cls_indices"][C.TUMOR_ID])
        comp = components(np.asarray(c["label"][0]) == C.TUMOR_ID, connectivity=3).ravel()[ix]
        np.testing.assert_allclose(w, np.bincount(comp)[comp] ** -0.5)
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert "label_cls_weights" not in batch and "label_cls_indices" not in batch
    assert isinstance(batch["image"], torch.Tensor) and list(batch["image"].shape[2:]) == TINY[bundle]["patch_size"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_command_line_booleans_are_read_as_booleans(bundle, phantoms, tmp_path):
    """fire hands `--amp false` / `--show_progress false` over as the string "false", which Python reads as true."""
    from ignite.handlers import ProgressBar

    over = tiny(bundle, dataset_dir=str(phantoms), ckpt_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "r"), cache_rate=0.0)
    parser = workflow(bundle, ["train.json"], "train", **over, amp="false", show_progress="false").parser
    assert parser.get_parsed_content("train#trainer").amp is False
    assert parser.get_parsed_content("validate#evaluator").amp is False
    bars = [h for h in parser.get_parsed_content("train#handlers") if isinstance(h, ProgressBar)]
    assert len(bars) == 1 and bars[0].tqdm_kwargs["disable"] is True
    parser = workflow(bundle, ["train.json"], "train", **over, show_progress="True").parser
    bars = [h for h in parser.get_parsed_content("train#handlers") if isinstance(h, ProgressBar)]
    assert bars[0].tqdm_kwargs["disable"] is False
    infer = workflow(
        bundle, ["inference.json"], "infer", **tiny(bundle), dataset_dir=str(phantoms / "imagesTr"), amp="false"
    ).parser
    assert infer.get_parsed_content("evaluator").amp is False
    with pytest.raises(Exception, match="amp"):
        workflow(
            bundle, ["inference.json"], "infer", **tiny(bundle), dataset_dir=str(phantoms / "imagesTr"), amp="maybe"
        ).parser.get_parsed_content("evaluator")


# --- evaluation on the original grid --------------------------------------------------------------------------------


def test_evaluate_matches_flare_evaluation_of_saved_predictions(trained, tmp_path):
    from flare23.evaluation.evaluate import score_case

    bundle = trained["bundle"]
    out = tmp_path / "eval"
    wf = workflow(
        bundle, ["train.json", "evaluate.json"], "train",
        **tiny(bundle, dataset_dir=str(trained["data"]), ckpt_dir=str(trained["ckpt_dir"]), output_dir=str(out)),
    )  # fmt: skip
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    metrics = dict(line.split(",") for line in (out / "metrics.csv").read_text().splitlines())
    datalist = json.loads((trained["data"] / "datalist.json").read_text())["validation"]
    scores = []
    for item in datalist:
        ref_path = trained["data"] / item["label"]
        case = Path(item["label"]).name.replace(".nii.gz", "")
        pred_path = out / "predictions" / f"{case}.nii.gz"
        ref, pred = nib.load(ref_path), nib.load(pred_path)
        assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-5)
        assert pred.get_data_dtype() == np.uint8
        scores.append(score_case(case, ref_path, pred_path)["scores"])
    organ_dsc = np.mean([np.mean([s[c][0] for c in C.ORGAN_IDS]) for s in scores])
    tumor_dsc = np.mean([s[C.TUMOR_ID][0] for s in scores])
    assert float(metrics["val_mean_organ_dsc"]) == pytest.approx(organ_dsc, abs=1e-6)
    assert float(metrics["val_tumor_dsc"]) == pytest.approx(tumor_dsc, abs=1e-6)


# --- inference: 15-class output in the input's geometry -------------------------------------------------------------


def lps_copy(src: Path, dst: Path) -> None:
    """Re-write a RAS image with LPS axes (flip x and y), keeping its physical placement."""
    img = nib.load(src)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = np.asanyarray(img.dataobj)[::-1, ::-1, :]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
    out = nib.Nifti1Image(np.ascontiguousarray(data), img.affine @ flip)
    out.set_data_dtype(img.get_data_dtype())
    nib.save(out, dst)


def test_inference_output_in_input_geometry(trained, tmp_path):
    bundle = trained["bundle"]
    inputs = tmp_path / "in"
    inputs.mkdir()
    src = trained["data"] / "imagesTr" / "phantom_0000_0000.nii.gz"
    shutil.copy(src, inputs / "ras_0000.nii.gz")
    lps_copy(src, inputs / "lps_0000.nii.gz")
    out = tmp_path / "out"
    wf = workflow(
        bundle, ["inference.json"], "infer",
        **tiny(bundle, dataset_dir=str(inputs), output_dir=str(out), ckpt_path=str(trained["ckpt_dir"] / "model.pt")),
    )  # fmt: skip
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    preds = {}
    for name in ("ras", "lps"):
        img, pred = nib.load(inputs / f"{name}_0000.nii.gz"), nib.load(out / f"{name}.nii.gz")
        assert pred.shape == img.shape
        assert np.array_equal(pred.affine, img.affine) or np.allclose(pred.affine, img.affine, atol=1e-6)
        assert pred.get_data_dtype() == np.uint8
        preds[name] = np.asanyarray(pred.dataobj)
        assert preds[name].max() < C.NUM_CLASSES
    # the LPS copy is the same image: its prediction is the RAS one with x and y reversed
    agree = np.mean(preds["lps"][::-1, ::-1, :] == preds["ras"])
    assert agree > 0.99
    assert not list(out.glob(".*"))  # no temporary files left


def test_inference_without_pretrain_warns_and_missing_checkpoint_fails(tmp_path):
    bundle = "organ_seg"
    inputs = tmp_path / "in"
    inputs.mkdir()
    img = np.zeros((40, 40, 12), dtype=np.int16)
    nib.save(nib.Nifti1Image(img, np.diag([5.0, 5.0, 8.0, 1.0])), inputs / "x_0000.nii.gz")
    wf = workflow(bundle, ["inference.json"], "infer", **tiny(bundle, dataset_dir=str(inputs), output_dir=str(tmp_path / "o")))
    wf.parser["ckpt_path"] = str(tmp_path / "nothing.pt")
    with pytest.raises(RuntimeError) as info:  # MONAI wraps errors of config expressions
        wf.initialize()
    assert isinstance(info.value.__cause__, Flare23Error) and "nothing.pt: checkpoint not found" in str(info.value.__cause__)
    wf.parser["load_pretrain"] = False
    with pytest.warns(UserWarning, match="random weights"):
        wf.initialize()
    wf.run()
    assert nib.load(tmp_path / "o" / "x.nii.gz").shape == img.shape


# --- config contract, multi-GPU mixins, fine-tuning ----------------------------------------------------------------


def test_check_properties_train_finetune_and_multi_gpu(trained, tmp_path, monkeypatch):
    bundle = trained["bundle"]
    base = tiny(bundle, **TRAIN, dataset_dir=str(trained["data"]), output_dir=str(tmp_path / "runs"))
    wf = workflow(bundle, ["train.json"], "train", ckpt_dir=str(tmp_path / "a"), **base)
    wf.initialize()
    assert wf.check_properties() == []
    # fine-tuning mixin: initialised from the trained model, lr 1e-4, batch 4, centred patches
    ft = workflow(
        bundle, ["train.json", "finetune.json"], "train",
        ckpt_dir=str(tmp_path / "ft"), pretrained_ckpt=str(trained["ckpt_dir"] / "model.pt"),
        **{k: v for k, v in base.items() if k != "batch_size"},
    )  # fmt: skip
    ft.initialize()
    assert ft.check_properties() == []
    assert ft.parser.get_parsed_content("learning_rate") == C.FINETUNE_LEARNING_RATE
    assert ft.parser.get_parsed_content("batch_size") == C.FINETUNE_BATCH_SIZE
    optimizer = ft.parser.get_parsed_content("optimizer")
    assert optimizer.param_groups[0]["lr"] == C.FINETUNE_LEARNING_RATE
    best = torch.load(trained["ckpt_dir"] / "model.pt", weights_only=True)
    net = ft.parser.get_parsed_content("network_def")
    assert all(torch.equal(net.state_dict()[k].cpu(), v) for k, v in best["model"].items())  # initialised from the checkpoint
    ratios = ft.parser.get_parsed_content("crop_ratios")
    if bundle == "tumor_seg":
        assert [i for i, r in enumerate(ratios) if r > 0] == [C.TUMOR_ID]
        assert ft.parser.get_parsed_content("crop_fallback_ratios")[1:14] == [1.0] * 13
    else:
        assert [i for i, r in enumerate(ratios) if r > 0] == list(C.ORGAN_IDS)
    # CPU mixin: Adam at its lr, per-class Dice, no flips (they swap left and right organs), no costly spatial augmentation
    cpu = workflow(bundle, ["train.json", "train_cpu.json"], "train", ckpt_dir=str(tmp_path / "cpu"), **base)
    cpu.initialize()
    assert cpu.check_properties() == []
    optimizer = cpu.parser.get_parsed_content("optimizer")
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == cpu.parser.get_parsed_content(
        "learning_rate"
    )
    assert cpu.parser.get_parsed_content("loss").loss.dice_mode == "per_class"
    assert all(cpu.parser.get_parsed_content(f"prob_{k}") == 0.0 for k in ("flip", "elastic", "rotation", "scaling"))
    cpu.finalize()
    # multi-GPU mixins on CPU (gloo), one process
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port.getsockname()[1]),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    port.close()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for files, ckpt in (
        (["train.json", "multi_gpu_train.json"], str(tmp_path / "mg")),
        (["train.json", "evaluate.json", "multi_gpu_evaluate.json"], str(trained["ckpt_dir"])),
    ):
        mg = workflow(bundle, files, "train", ckpt_dir=ckpt, **base)
        mg.initialize()
        try:
            assert torch.distributed.get_backend() == "gloo"
            assert mg.check_properties() == []
            assert isinstance(mg.parser.get_parsed_content("network"), torch.nn.parallel.DistributedDataParallel)
            if bundle == "organ_seg":  # the two bundles' mixins differ only in names: run one
                mg.run()
        finally:
            mg.finalize()
        assert not torch.distributed.is_initialized()
    assert (tmp_path / "mg" / "checkpoint_epoch=2.pt").exists() == (bundle == "organ_seg")


def _dotted(name: str) -> str:
    """A config's class name (a MONAI short name or a dotted path) as module.qualname."""
    from flare23.models.spec import _locate

    cls = _locate(name)
    return f"{cls.__module__}.{cls.__qualname__}"


def test_configs_read_the_constants(tmp_path):
    from monai.bundle import ConfigParser

    for bundle in BUNDLES:
        organ = bundle == "organ_seg"
        for name in ("train.json", "inference.json"):
            p = ConfigParser()
            p.read_config(str(configs(bundle) / name))
            get = p.get_parsed_content
            assert get("target_spacing") == list(C.ORGAN_SPACING_XYZ if organ else C.TUMOR_SPACING_XYZ)
            assert get("patch_size") == list(C.ORGAN_PATCH_XYZ if organ else C.TUMOR_PATCH_XYZ)
            assert get("overlap") == (C.ORGAN_OVERLAP if organ else C.TUMOR_OVERLAP)
            assert get("num_classes") == C.NUM_CLASSES
            assert get("normalization") == C.FINGERPRINT_DEFAULTS[MODEL[bundle]]
            assert [list(k) for k in get("network_def#kernel_size")] == [list(k) for k in C.KERNELS_XYZ]
            strides = C.ORGAN_STRIDES_XYZ if organ else C.TUMOR_STRIDES_XYZ
            assert [list(s) for s in get("network_def#strides")] == [list(s) for s in strides]
            assert [list(s) for s in get("network_def#upsample_kernel_size")] == [list(s) for s in strides[1:]]
            assert get("network_def#filters") == list(C.FILTERS)
            assert get("network_def#res_block")
            # training has the deep-supervision heads (the loss uses them); inference is built without them (scriptable)
            assert get("network_def#deep_supervision") is (name == "train.json")
            # a fingerprint file written by `flare23 fingerprint` replaces the defaults
            fp = tmp_path / f"{bundle}_fp.json"
            fp.write_text(json.dumps({MODEL[bundle]: {"clip_low": -100, "clip_high": 200, "mean": 10, "std": 50}}))
            p["fingerprint_file"] = str(fp)
            p.ref_resolver.reset()
            assert get("normalization") == {"clip_low": -100.0, "clip_high": 200.0, "mean": 10.0, "std": 50.0}
        p = ConfigParser()
        p.read_config(str(configs(bundle) / "train.json"))
        get = p.get_parsed_content
        assert (get("batch_size"), get("epoch_length"), get("learning_rate")) == (C.BATCH_SIZE, C.EPOCH_LENGTH, C.LEARNING_RATE)
        assert get("dice_mode") == "global" and get("lambda_focal") == 1.0 and get("focal_gamma") == 2.0
        weights = get("class_weights")
        if organ:
            assert [i for i, w in enumerate(weights) if w != 1.0] == [7, 8, 9, 10] and weights[7] == 2.0
            assert [i for i, r in enumerate(get("crop_ratios")) if r > 0] == list(C.ORGAN_IDS)
        else:
            assert [i for i, w in enumerate(weights) if w != 1.0] == [C.TUMOR_ID] and weights[C.TUMOR_ID] == 2.0
            r = get("crop_ratios")
            assert r[C.TUMOR_ID] == sum(r[c] for c in C.ORGAN_IDS)  # half of the patches tumor-centred
        # train.json and inference.json build the same network but for the deep-supervision heads (the pipeline reuses
        # inference.json's); inference builds it through flare23.models.trained.trained_network, which follows the
        # checkpoint's recorded settings and drops the heads' weights by name
        q = ConfigParser()
        q.read_config(str(configs(bundle) / "inference.json"))
        inference = dict(q.get("network_def"))
        assert inference.pop("_target_") == "flare23.models.trained.trained_network" and inference.pop("settings") == "@trained"
        # train.json's class is NativeHeadsDynUNet, DynUNet's network with its heads at their own resolution
        # (flare23.models.spec.SAME_NETWORK_AS: the same weights and inference output)
        from flare23.models.spec import SAME_NETWORK_AS

        trained = dict(p.get("network_def"))
        assert SAME_NETWORK_AS[trained.pop("_target_")] == "monai.networks.nets.dynunet.DynUNet" == _dotted(inference.pop("network"))
        assert {**inference, "deep_supervision": True} == trained


def test_network_from_config_deep_supervision_and_loss():
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(str(configs("organ_seg") / "train.json"))
    p["network_def"]["filters"] = [4, 8, 8, 8, 8, 8]
    p["device"] = "$torch.device('cpu')"
    net = p.get_parsed_content("network")
    loss = p.get_parsed_content("loss")
    x = torch.randn(2, 1, 64, 64, 16)
    y = torch.randint(0, C.NUM_CLASSES, (2, 1, 64, 64, 16))
    net.train()
    out = net(x)  # full resolution + 3 deep-supervision heads, each at its own stage's size
    assert [tuple(o.shape) for o in out] == [(2, C.NUM_CLASSES, *s) for s in ((64, 64, 16), (32, 32, 16), (16, 16, 8), (8, 8, 4))]
    value = loss(out, y)
    value.backward()
    assert torch.isfinite(value)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, C.NUM_CLASSES, 64, 64, 16)


# --- metadata and bundle files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_validates_and_matches_constants(bundle):
    meta = json.loads((configs(bundle) / "metadata.json").read_text())
    for schema_file in ("meta_schema_20240725.json",):
        schema_path = SCHEMAS / schema_file
        if not schema_path.exists():
            pytest.skip(f"{schema_path} missing")
        jsonschema.validate(meta, json.loads(schema_path.read_text()))
    assert meta["version"] in meta["changelog"]
    assert "optional_packages_version" not in meta  # one requirements key (the deprecated one made MONAI warn)
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == C.CHANNEL_DEF and pred["num_channels"] == C.NUM_CLASSES
    patch = C.ORGAN_PATCH_XYZ if bundle == "organ_seg" else C.TUMOR_PATCH_XYZ
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == list(patch)
    fp = C.FINGERPRINT_DEFAULTS[MODEL[bundle]]
    assert meta["network_data_format"]["inputs"]["image"]["value_range"] == [fp["clip_low"], fp["clip_high"]]
    assert KEY_METRIC[bundle] in meta["eval_metrics"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_files(bundle):
    import yaml

    root = ROOT / "bundles" / bundle
    assert "Apache License" in (root / "LICENSE").read_text()
    readme = (root / "docs" / "README.md").read_text()
    for section in ("## Data", "## Training configuration", "## Performance", "## MONAI bundle commands", "| paper |"):
        assert section in readme, section
    assert (root / "docs" / "data_license.txt").read_text().strip()
    assert isinstance(yaml.safe_load((root / "large_files.yml").read_text()), dict)
    conf = configparser.ConfigParser()
    conf.read(configs(bundle) / "logging.conf")
    for section in conf.sections():
        if section.startswith("handler_"):
            cls = conf[section]["class"]
            assert cls in ("StreamHandler", "FileHandler") or cls.startswith(("logging.", "handlers.")), cls
    for name in ("train", "evaluate", "inference", "multi_gpu_train", "multi_gpu_evaluate", "finetune"):
        json.loads((configs(bundle) / f"{name}.json").read_text())


# --- transforms -----------------------------------------------------------------------------------------------------


def test_ct_normalized_equals_monai_clip_then_zscore():
    from monai.data import MetaTensor
    from monai.transforms import Compose, NormalizeIntensityd, ScaleIntensityRanged

    from flare23.models.transforms import CTNormalize, CTNormalized

    fp = C.FINGERPRINT_DEFAULTS["organ"]
    rng = np.random.default_rng(0)
    raw = rng.uniform(-1500, 1500, (1, 9, 8, 7)).astype(np.float32)
    affine = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0], dtype=torch.float64))
    img = MetaTensor(torch.tensor(raw), affine=affine)
    before = img.clone()
    ours = CTNormalized("image", **fp)({"image": img})["image"]
    lo, hi = fp["clip_low"], fp["clip_high"]
    monai_way = Compose(
        [
            ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True),
            NormalizeIntensityd("image", subtrahend=fp["mean"], divisor=fp["std"]),
        ]
    )({"image": MetaTensor(torch.tensor(raw), affine=affine)})["image"]
    assert torch.allclose(ours.as_tensor(), monai_way.as_tensor(), atol=1e-5)
    assert ours.dtype == torch.float32 and torch.equal(ours.affine, affine)
    assert torch.equal(img, before)  # input untouched
    assert np.allclose(CTNormalize(**fp)(raw), ours.numpy(), atol=1e-6)  # numpy path
    with pytest.raises(Flare23Error, match="std must be positive"):
        CTNormalize(-1, 1, 0, 0)
    with pytest.raises(Flare23Error, match="below clip_high"):
        CTNormalize(5, 1, 0, 1)


def test_atomic_writer_and_case_names(tmp_path):
    from monai.data import MetaTensor
    from monai.transforms import SaveImaged

    from flare23.models.transforms import case_name_formatter

    affine = torch.tensor([[-2.0, 0, 0, 10], [0, -2.0, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]], dtype=torch.float64)
    data = torch.arange(4 * 5 * 6).reshape(1, 4, 5, 6) % 15
    pred = MetaTensor(data, affine=affine, meta={"filename_or_obj": "/x/case_0007_0000.nii.gz"})
    saver = SaveImaged(
        "pred", output_dir=str(tmp_path), output_postfix="", output_dtype=np.uint8, resample=False, separate_folder=False,
        output_name_formatter=case_name_formatter, writer="flare23.models.transforms.AtomicNibabelWriter",
    )  # fmt: skip
    saver({"pred": pred})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_0007.nii.gz"]
    img = nib.load(tmp_path / "case_0007.nii.gz")
    assert np.array_equal(np.asanyarray(img.dataobj), data[0].numpy()) and img.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, affine.numpy())
    assert case_name_formatter({"filename_or_obj": "a/b/liver_12.nii"})["subject"] == "liver_12"


logging.getLogger("ignite").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*TensorBoard.*")


def _bundle_network(bundle: str, filters):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
    parser.update({"network_def#filters": list(filters)})
    return parser.get_parsed_content("network_def")


def test_transfer_initialises_the_tumor_model_from_the_organ_model(tmp_path):
    from flare23.training.checkpoints import load_weights

    torch.manual_seed(0)
    organ, tumor = _bundle_network("organ_seg", [4, 4, 8, 8, 8, 8]), _bundle_network("tumor_seg", [4, 4, 8, 8, 8, 8])
    torch.save(organ.state_dict(), tmp_path / "organ.pt")
    with pytest.raises(Flare23Error, match="organ.pt: checkpoint shapes do not match"):
        load_weights(tumor, tmp_path / "organ.pt")  # strict by default
    with pytest.raises(Flare23Error, match="organ.pt: checkpoint shapes do not match"):
        load_weights(tumor, tmp_path / "organ.pt", transfer="false")  # as a command line gives it
    load_weights(tumor, tmp_path / "organ.pt", transfer="true")
    src, dst = organ.state_dict(), tumor.state_dict()
    differ = [k for k in dst if src[k].shape != dst[k].shape]
    assert differ and all(k.endswith("transp_conv.conv.weight") for k in differ)
    assert all(torch.equal(dst[k], src[k]) for k in dst if k not in differ)
    # the deepest up-sampling: stride 2 along z in the organ model, 1 in the tumor model; with the
    # summed kernel, slice i of the tumor layer's output is the sum of the organ layer's slices 2i, 2i+1
    up_o, up_t = organ.upsamples[0].transp_conv.conv, tumor.upsamples[0].transp_conv.conv
    assert up_o.stride[-1] == 2 and up_t.stride[-1] == 1 and up_o.bias is None and up_t.bias is None
    x = torch.randn(1, up_o.in_channels, 2, 3, 4)
    with torch.no_grad():
        yo, yt = up_o(x), up_t(x)
    torch.testing.assert_close(yt, yo[..., 0::2] + yo[..., 1::2], rtol=1e-5, atol=1e-5)
    # networks of other widths do not transfer
    torch.save(_bundle_network("organ_seg", [4, 8, 8, 8, 8, 8]).state_dict(), tmp_path / "wider.pt")
    with pytest.raises(Flare23Error, match=r"wider.pt: cannot transfer weights, .* there and .* here"):
        load_weights(tumor, tmp_path / "wider.pt", transfer=True)
