"""The roi_extractor bundle: metadata, config contract, a tiny training (+ resume), inference, evaluation, DDP on CPU.

Every run writes under tmp_path (ckpt_dir / output_dir overrides); tiny network and patch.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import ignite.distributed as idist
import jsonschema
import monai
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from flare23.constants import LABELS, ROI_MIRROR_AXES, ROI_NUM_CLASSES
from flare23.io import case_name, load_nifti
from flare23.models.networks import LightUNet
from flare23.roi.box import locate, upsample_mask
from flare23.roi.coverage import box_coverage
from flare23.roi.geometry import roi_labels, subsample
from flare23.training.checkpoints import load_weights

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "roi_extractor"
CONFIGS = BUNDLE / "configs"
FILTERS = [4, 8, 8, 8, 8]
TINY = ["--network_def#filters", json.dumps(FILTERS), "--num_workers", "0"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run_bundle(args: list[str], launcher: list[str] | None = None, timeout: int = 600) -> str:
    cmd = (launcher or [sys.executable, "-m"]) + ["monai.bundle", "run", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def workflow(files: list[str], workflow_type: str, **overrides) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,  # do not reconfigure the test process's logging
        workflow_type=workflow_type,
        **overrides,
    )


def tiny_net(path: Path) -> LightUNet:
    return load_weights(LightUNet(filters=FILTERS), path).eval()


@pytest.fixture(scope="module")
def trained(tiny_phantoms, tmp_path_factory) -> dict:
    """One tiny training run through ``python -m monai.bundle run training``."""
    tmp = tmp_path_factory.mktemp("roi_train")
    ckpt, out = tmp / "models", tmp / "runs"
    common = ["--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(tiny_phantoms), "--epoch_length", "2",
              "--patch_size", "[32,32,16]", "--val_interval", "1", "--ckpt_dir", str(ckpt), "--output_dir", str(out), *TINY]  # fmt: skip
    log = run_bundle(["training", *common, "--max_epochs", "1"])
    return {"ckpt": ckpt, "out": out, "log": log, "common": common, "data": tiny_phantoms}


# --- metadata and config contract -----------------------------------------------------------------
def test_metadata_validates_and_matches_the_constants(shared_dir):
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for schema in ("meta_schema_20240725.json",):
        jsonschema.validate(meta, json.loads((shared_dir / "schemas" / schema).read_text()))
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == monai.__version__
    assert torch.__version__.startswith(meta["pytorch_version"])
    assert "optional_packages_version" not in meta  # one requirements key (the deprecated one made MONAI warn)
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == ROI_NUM_CLASSES == len(pred["channel_def"])
    assert pred["channel_def"]["0"] == LABELS[0]
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    assert (BUNDLE / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "class=StreamHandler" in (CONFIGS / "logging.conf").read_text()


def test_contract_ids_present():
    train = json.loads((CONFIGS / "train.json").read_text())
    for key in ("bundle_root", "dataset_dir", "datalist", "ckpt_dir", "output_dir", "device", "max_epochs", "epoch_length",
                "batch_size", "patch_size", "learning_rate", "network_def", "run", "training"):  # fmt: skip
        assert key in train, key
    assert "filters" in train["network_def"]
    infer = json.loads((CONFIGS / "inference.json").read_text())
    for key in ("bundle_root", "dataset_dir", "datalist", "output_dir", "device", "network_def", "network", "preprocessing",
                "dataset", "dataloader", "inferer", "postprocessing", "handlers", "evaluator", "checkpointloader",
                "initialize", "load_pretrain", "run", "evaluating"):  # fmt: skip
        assert key in infer, key
    evaluate = json.loads((CONFIGS / "evaluate.json").read_text())
    assert evaluate["evaluating"] == "@run"


@pytest.mark.parametrize(
    "files,kind",
    [
        (["train.json"], "train"),
        (["train.json", "evaluate.json"], "train"),
        (["inference.json"], "infer"),
        (["train.json", "multi_gpu_train.json"], "train"),
        (["train.json", "evaluate.json", "multi_gpu_evaluate.json"], "train"),
    ],
)
def test_check_properties_is_empty(files, kind, tiny_phantoms, tmp_path, dist_env):
    data = tiny_phantoms / "imagesTr" if kind == "infer" else tiny_phantoms
    extra = {"load_pretrain": False} if kind == "infer" else {}
    if "evaluate.json" in files:  # evaluation loads models/model.pt in initialize (the one weights loader)
        (tmp_path / "models").mkdir()
        torch.save({"model": LightUNet().state_dict()}, tmp_path / "models" / "model.pt")
        extra["ckpt_dir"] = str(tmp_path / "models")
    wf = workflow(files, kind, dataset_dir=str(data), num_workers=0, output_dir=str(tmp_path), **extra)
    try:
        wf.initialize()
        assert wf.check_properties() == []
    finally:
        wf.finalize()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        idist.sync()  # ignite caches the distributed context: back to serial for the other tests


# --- training, resume ------------------------------------------------------------------------------
def test_training_writes_checkpoints_and_best_model(trained):
    ckpt = trained["ckpt"]
    assert (ckpt / "checkpoint_epoch=1.pt").is_file() and (ckpt / "model.pt").is_file()
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert set(state) == {"model", "settings"}  # the network's state dict and what inference needs (flare23.models.trained)
    assert not any(k.startswith("module.") for k in state["model"])  # a plain state dict of the network
    assert state["settings"]["network"]["filters"] == FILTERS and state["settings"]["model"] == "roi"
    tiny_net(ckpt / "model.pt")  # strict load into the tiny network
    full = torch.load(ckpt / "checkpoint_epoch=1.pt", weights_only=True)
    assert set(full) == {"model", "optimizer", "lr_scheduler", "trainer", "best_model", "settings"}
    assert full["trainer"]["iteration"] == 2 and full["trainer"]["epoch_length"] == 2
    assert full["optimizer"]["param_groups"][0]["nesterov"] is True
    assert list(trained["out"].glob("events.out.tfevents.*"))
    assert "val_roi_dice" in trained["log"]


def test_training_resumes_from_the_last_checkpoint(trained, tmp_path, caplog):
    # a copy of the checkpoint folder, so that the other tests keep epoch 1
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    for p in trained["ckpt"].iterdir():
        (ckpt / p.name).write_bytes(p.read_bytes())
    overrides = dict(dataset_dir=str(trained["data"]), epoch_length=2, patch_size=[32, 32, 16], val_interval=1, ckpt_dir=str(ckpt),
                     output_dir=str(tmp_path / "runs"), max_epochs=2, num_workers=0)  # fmt: skip
    wf = workflow(["train.json"], "train", run_id="training", **overrides)
    wf.parser["network_def"]["filters"] = FILTERS
    wf.initialize()
    with caplog.at_level("INFO", logger="flare23.training"):
        wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    wf.finalize()
    assert any("resumed from" in r.getMessage() for r in caplog.records)
    assert trainer.state.epoch == 2 and trainer.state.iteration == 4  # only epoch 2 ran
    state = torch.load(ckpt / "checkpoint_epoch=2.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 4
    # the scheduler continued: poly decay after 2 of 2 epochs
    assert state["lr_scheduler"]["last_epoch"] == 2


def test_training_can_start_from_pretrained_weights(trained, tmp_path):
    wf = workflow(["train.json"], "train", dataset_dir=str(trained["data"]), ckpt_dir=str(tmp_path), output_dir=str(tmp_path),
                  pretrained_ckpt=str(trained["ckpt"] / "model.pt"), resume="false", num_workers=0)  # fmt: skip
    wf.parser["network_def"]["filters"] = FILTERS
    wf.initialize()
    got = wf.parser.get_parsed_content("network").state_dict()
    wf.finalize()
    expected = torch.load(trained["ckpt"] / "model.pt", weights_only=True)["model"]
    assert set(got) == set(expected) and all(torch.equal(got[k].cpu(), expected[k]) for k in expected)


# --- inference and evaluation ---------------------------------------------------------------------
def test_inference_writes_masks_and_boxes_in_the_input_geometry(trained, tmp_path):
    out = tmp_path / "eval"
    run_bundle(["evaluating", "--config_file", str(CONFIGS / "inference.json"), "--dataset_dir", str(trained["data"] / "imagesTr"),
                "--output_dir", str(out), "--ckpt_path", str(trained["ckpt"] / "model.pt"), *TINY])  # fmt: skip
    net = tiny_net(trained["ckpt"] / "model.pt")
    images = sorted((trained["data"] / "imagesTr").glob("*.nii.gz"))
    assert len(images) == 6
    orientations = set()
    for image in images:
        arr, affine, _ = load_nifti(image)
        orientations.add(nib.aff2axcodes(affine))
        mask_img = nib.load(out / f"{case_name(image)}_roi.nii.gz")
        assert mask_img.shape == arr.shape and mask_img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask_img.affine, affine, atol=1e-4)
        # the bundle's default mirrored pass (RAS axes) is locate's mirror_axes
        box, mask_sub, strides, offsets = locate(net, arr, affine, return_mask=True, mirror_axes=ROI_MIRROR_AXES)
        expected = upsample_mask(mask_sub, strides, arr.shape, offsets).numpy()
        np.testing.assert_array_equal(np.asarray(mask_img.dataobj), expected)
        info = json.loads((out / f"{case_name(image)}_roi_box.json").read_text())
        assert info["source"] == str(image)
        if box is None:
            assert info["empty"] is True
        else:
            assert (info["start"], info["stop"]) == (list(box.start), list(box.stop))
            assert info["extent_mm"] == box.to_json(affine)["extent_mm"]
    assert len(orientations) > 1  # the phantoms come in several orientations
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_inference_without_weights_warns(tiny_phantoms, tmp_path):
    wf = workflow(["inference.json"], "infer", dataset_dir=str(tiny_phantoms / "imagesTr"), output_dir=str(tmp_path), load_pretrain="false",
                  num_workers=0, datalist=[{"image": str(sorted((tiny_phantoms / "imagesTr").glob("*.nii.gz"))[0])}])  # fmt: skip
    wf.parser["network_def"]["filters"] = FILTERS
    with pytest.warns(UserWarning, match="random weights"):
        wf.initialize()
    wf.run()
    wf.finalize()
    assert len(list(tmp_path.glob("*_roi.nii.gz"))) == 1 and len(list(tmp_path.glob("*_roi_box.json"))) == 1


def test_evaluate_reports_dice_and_box_coverage(trained, tmp_path):
    out = tmp_path / "eval"
    wf = workflow(["train.json", "evaluate.json"], "train", dataset_dir=str(trained["data"]), ckpt_dir=str(trained["ckpt"]),
                  output_dir=str(out), num_workers=0)  # fmt: skip
    wf.parser["network_def"]["filters"] = FILTERS
    wf.initialize()
    wf.run()
    wf.finalize()
    with open(out / "metrics.csv") as f:
        metrics = {row[0]: float(row[1]) for row in csv.reader(f)}
    # recompute with the package functions: Dice on the subsampled grid, coverage of full-resolution organs
    net = tiny_net(trained["ckpt"] / "model.pt")
    datalist = json.loads((trained["data"] / "datalist.json").read_text())["validation"]
    dices, coverages = [], []
    for item in datalist:
        arr, affine, _ = load_nifti(trained["data"] / item["image"])
        label, _, _ = load_nifti(trained["data"] / item["label"])
        box, mask_sub, strides, offsets = locate(net, arr, affine, return_mask=True, mirror_axes=ROI_MIRROR_AXES)
        ref = roi_labels(subsample(label, strides, offsets)).bool()
        pred = mask_sub.bool()
        g, p = int(ref.sum()), int(pred.sum())
        dices.append(1.0 if g == p == 0 else 2 * int((ref & pred).sum()) / (g + p))
        coverages.append(box_coverage(box, label))
    assert metrics["val_roi_dice"] == pytest.approx(np.mean(dices), abs=1e-6)
    assert metrics["val_box_coverage_mean"] == pytest.approx(np.mean(coverages), abs=1e-6)
    assert metrics["val_box_coverage_min"] == pytest.approx(min(coverages), abs=1e-6)
    assert len(list((out / "boxes").glob("*_roi_box.json"))) == len(datalist)


@pytest.mark.slow
def test_multi_gpu_train_runs_with_gloo_on_cpu(tiny_phantoms, tmp_path):
    files = json.dumps([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=1", "-m"]
    run_bundle(["--config_file", files, "--dataset_dir", str(tiny_phantoms), "--max_epochs", "1", "--epoch_length", "2",
                "--patch_size", "[32,32,16]", "--val_interval", "1", "--ckpt_dir", str(tmp_path / "m"), "--output_dir",
                str(tmp_path / "r"), *TINY], launcher=launcher)  # fmt: skip
    assert (tmp_path / "m" / "checkpoint_epoch=1.pt").is_file() and (tmp_path / "m" / "model.pt").is_file()
    tiny_net(tmp_path / "m" / "model.pt")  # DDP's "module." prefix is not in the saved weights
