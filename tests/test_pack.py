"""Combined pipeline checkpoint (MONAI Label) and strict, weights-only loading of the three networks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flare23.bundles import SubBundle
from flare23.errors import Flare23Error
from flare23.inference.branches import CascadeNetworks
from flare23.inference.weights import pack_checkpoints
from flare23.training.checkpoints import load_weights

ROOT = Path(__file__).resolve().parents[1] / "bundles"
OVR = {
    "roi": {"network_def#filters": [4, 8, 8, 8, 8]},
    "organ": {"network_def#filters": [4, 8, 8, 8, 8, 8]},
    "tumor": {"network_def#filters": [4, 8, 8, 8, 8, 8]},
}
DIRS = {"roi": "roi_extractor", "organ": "organ_seg", "tumor": "tumor_seg"}


def _networks():
    return CascadeNetworks(**{p: SubBundle(ROOT / DIRS[p], "inference.json", OVR[p]).network() for p in DIRS})


@pytest.fixture()
def ckpts(tmp_path):
    nets = _networks()
    paths = {}
    for part in DIRS:
        paths[part] = tmp_path / f"{part}.pt"
        torch.save(getattr(nets, part).state_dict(), str(paths[part]))
    return nets, paths


def test_pack_round_trip(ckpts, tmp_path):
    nets, paths = ckpts
    out = pack_checkpoints(paths["roi"], paths["organ"], paths["tumor"], tmp_path / "model.pt", _networks())
    fresh = _networks()
    load_weights(fresh, out)
    for key, value in nets.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    state = torch.load(str(out), weights_only=True)
    assert {k.split(".")[0] for k in state["model"]} == {"roi", "organ", "tumor"}

    # load_async prefers the three sub-checkpoints, falls back to the combined one
    other = _networks()
    other.load_async(None, None, None, combined_ckpt=out).join()
    assert all(torch.equal(other.state_dict()[k], v) for k, v in nets.state_dict().items())


def test_mismatched_checkpoint_is_refused_not_partially_loaded(ckpts, tmp_path):
    _, paths = ckpts
    bigger = SubBundle(ROOT / "organ_seg", "inference.json", {"network_def#filters": [8, 8, 8, 8, 8, 8]}).network()
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(Flare23Error, match="shapes do not match"):
        load_weights(bigger, paths["organ"])
    assert all(torch.equal(before[k], v) for k, v in bigger.state_dict().items())
    # a missing checkpoint surfaces, as a one-line error, when its stage waits for it
    nets = _networks()
    nets.load_async(paths["roi"], tmp_path / "missing.pt", paths["tumor"])
    assert nets.wait("roi") is nets.roi
    with pytest.raises(Flare23Error, match="checkpoint not found"):
        nets.wait("organ")
    # the ROI network's checkpoint does not fit the organ network: refused, not partially loaded
    with pytest.raises(Flare23Error, match="does not match the network"):
        load_weights(_networks().organ, paths["roi"])


def test_crafted_pickle_is_refused_without_running_its_payload(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, str(bad), _use_new_zipfile_serialization=True)
    net = torch.nn.Linear(2, 2)
    with pytest.raises(Flare23Error, match="refused to load checkpoint"):
        load_weights(net, bad)
    assert not marker.exists()
