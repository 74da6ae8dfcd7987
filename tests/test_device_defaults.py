"""Settings that follow the device the cascade runs on: windows per forward pass, the engine, and the device the
pipeline hands its sub-bundles (so that a sub-bundle's device-derived ids are those of the run)."""

from __future__ import annotations

import pytest
import torch

from flare23.errors import Flare23Error
from flare23.inference.engine import resolve_engine
from flare23.inference.segment import config_workflow, pipeline_config
from flare23.inference.sliding import SW_BATCH_SIZE, default_sw_batch_size
from flare23.inference.weights import with_weights

ROOT = pipeline_config().parents[2]


def test_windows_per_forward_pass_by_device():
    assert default_sw_batch_size("cpu") == 1 == default_sw_batch_size(torch.device("cpu"))
    assert default_sw_batch_size("cuda:1") == SW_BATCH_SIZE["cuda"] == 2
    assert default_sw_batch_size("meta") == 1


@pytest.mark.parametrize("bundle", ["organ_seg", "tumor_seg"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_fine_bundle_takes_its_windows_per_pass_from_its_device(bundle, device):
    from flare23.bundles import SubBundle

    sub = SubBundle(ROOT / bundle, "inference.json", {"load_pretrain": False, "device": torch.device(device)})
    assert sub.get("sw_batch_size") == SW_BATCH_SIZE[device]


def _pipeline(device: str):
    config = pipeline_config()
    return config_workflow(config_file=str(config), workflow_type="infer", bundle_root=str(config.parents[1]),
                           dataset_dir="unused", output_dir="unused", load_pretrain=False, device=device)  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_pipeline_gives_its_sub_bundles_its_own_device(device):
    """Not the sub-bundles' own default (CUDA where there is one): ``--device cpu`` on a GPU machine runs one window
    per pass, as the CPU wants. Parsing needs no GPU (nothing is moved to the device here)."""
    workflow = _pipeline(device)
    inferer = workflow.parser.get_parsed_content("inferer")
    assert inferer.organ.sw_batch_size == inferer.tumor.sw_batch_size == SW_BATCH_SIZE[device]
    for part in ("roi", "organ", "tumor"):
        assert workflow.parser.get_parsed_content(f"{part}_config").get("device") == torch.device(device)


def test_a_device_inside_the_overrides_is_refused():
    with pytest.raises(Flare23Error, match="organ_overrides: device is set by the pipeline"):
        with_weights({"device": "cpu"}, "", False, "organ", "cuda")
    assert "device" not in with_weights({}, "", False, "organ")  # the sub-bundle alone keeps its own default


def test_the_default_engine_is_openvino_on_a_cpu_and_pytorch_on_cuda():
    engine = _pipeline("cpu").parser.get_parsed_content("engine")
    assert engine == "auto"
    assert resolve_engine(engine, "cpu") == "openvino" and resolve_engine(engine, "cuda") == "torch"
