"""The OpenVINO engine: same logits as PyTorch on tiny networks, a cache that is never trusted when stale or damaged."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from test_segment_cli import checkpoints, phantom  # noqa: F401 - fixtures

from flare23.constants import KERNELS_XYZ, ORGAN_STRIDES_XYZ, TUMOR_STRIDES_XYZ
from flare23.errors import Flare23Error
from flare23.inference.engine import CACHE_FOLDER, OpenVinoNetwork, cache_dir_for, resolve_engine, weights_digest
from flare23.models.networks import LightUNet, NnDynUNet

WINDOW = (64, 64, 32)  # the smallest the tiny networks take: 1 voxel at the bottom is refused by instance norm
# logits of the tiny networks agree to float32 rounding of two implementations of the same graph; the
# stated tolerance, checked on probabilities and labels as the cascade uses them:
PROB_ATOL = 1e-4
MIN_LABEL_AGREEMENT = 0.999


def fine(strides=ORGAN_STRIDES_XYZ, seed=0):
    torch.manual_seed(seed)
    return NnDynUNet(spatial_dims=3, in_channels=1, out_channels=15, kernel_size=KERNELS_XYZ, strides=strides,
                     upsample_kernel_size=strides[1:], filters=[4, 8, 8, 8, 8, 8], norm_name="instance",
                     deep_supervision=False).eval()  # fmt: skip


def roi_net(seed=0):
    torch.manual_seed(seed)
    return LightUNet(filters=[4, 8, 8, 8, 8]).eval()


@pytest.fixture(scope="module")
def organ(tmp_path_factory):
    """A tiny organ network and its converted cache (converted once for the module)."""
    net = fine()
    folder = tmp_path_factory.mktemp("cache")
    # one thread, fixed: OpenVINO's results depend on its thread count, and tests that other modules import set torch's
    engine = OpenVinoNetwork(net, WINDOW, folder, name="organ", threads=1)
    assert engine.converted
    return net, folder, engine


@pytest.mark.parametrize("make", [lambda: fine(TUMOR_STRIDES_XYZ), roi_net], ids=["tumor", "roi"])
def test_openvino_equals_pytorch_on_batches_of_any_size(make, tmp_path, organ):
    net = make()
    engine = OpenVinoNetwork(net, WINDOW, tmp_path, name="n")
    check_equal(net, engine)
    check_equal(*organ[::2])


def check_equal(net, engine):
    torch.manual_seed(1)
    for n in (1, 3):  # sw_batch_size and a smaller last batch use the same compiled model
        x = torch.randn(n, 1, *WINDOW) * 2
        with torch.no_grad():
            expected = net(x)
        got = engine(x)
        assert got.shape == expected.shape and got.dtype == torch.float32
        torch.testing.assert_close(torch.softmax(got, 1), torch.softmax(expected, 1), atol=PROB_ATOL, rtol=0)
        agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
        assert agreement >= MIN_LABEL_AGREEMENT


# bf16 keeps 8 bits of mantissa: the stated tolerance of a bf16 run against fp32, on probabilities and labels
BF16_PROB_ATOL = 0.1
BF16_MIN_LABEL_AGREEMENT = 0.98


def test_where_the_run_autocasts_to_bf16_openvino_runs_in_bf16_and_matches_pytorchs_bf16(organ):
    """``precision`` auto on a CPU with native bf16 (or ``bf16``) runs PyTorch under bf16 autocast: the engine runs
    OpenVINO in bf16 then (before: it gave the network back to PyTorch), fp32 otherwise; both within bf16's tolerance
    of fp32 and as close to it as PyTorch's own bf16."""
    from flare23.inference.cascade import cpu_has_fast_bf16
    from flare23.inference.engine import EngineNetworks

    net, folder, _ = organ
    engines = EngineNetworks("openvino", folder)
    bf16 = engines.network_for("organ", WINDOW, net, torch.device("cpu"), autocast=True)
    fp32 = engines.network_for("organ", WINDOW, net, torch.device("cpu"), autocast=False)
    assert isinstance(bf16, OpenVinoNetwork) and isinstance(fp32, OpenVinoNetwork) and bf16 is not fp32
    assert (bf16.inference_precision, fp32.inference_precision) == ("bf16", "f32")
    assert not bf16.converted  # one cached conversion serves both precisions
    import openvino as ov

    hint = bf16.compiled.get_property("INFERENCE_PRECISION_HINT")
    assert hint == ov.Type.bf16 if cpu_has_fast_bf16() else hint in (ov.Type.bf16, ov.Type.f32)  # f32 without bf16 kernels
    assert fp32.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    torch.manual_seed(2)
    x = torch.randn(2, 1, *WINDOW) * 2
    with torch.no_grad():
        reference = torch.softmax(net(x), 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch_bf16 = torch.softmax(net(x).float(), 1)
    got = torch.softmax(bf16(x), 1)
    error, torch_error = (got - reference).abs(), (torch_bf16 - reference).abs()
    # measured on the AVX-512-BF16 machine: max / mean 0.069 / 7.4e-4 (OpenVINO) against 0.065 / 7.9e-4 (PyTorch)
    assert error.max() <= BF16_PROB_ATOL
    assert error.mean() <= 1.5 * torch_error.mean() + 1e-6, (error.mean().item(), torch_error.mean().item())
    agreement = (got.argmax(1) == reference.argmax(1)).float().mean().item()
    torch_agreement = (torch_bf16.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement >= min(BF16_MIN_LABEL_AGREEMENT, torch_agreement - 0.005), (agreement, torch_agreement)
    check_equal(net, fp32)


def test_released_buffers_come_back_with_the_next_window(organ):
    net, _, engine = organ
    x = torch.randn(1, 1, *WINDOW)
    before = engine(x)
    engine.release_memory()
    torch.testing.assert_close(engine(x), before, atol=0, rtol=0)


def test_the_cascade_releases_each_engine_network_when_its_windows_are_done(monkeypatch):
    """The organ network's buffers (1.5 GB at the paper's widths) are handed back before the tumor network runs."""
    from test_window_skip import _body_phantom, _Organs, _segment, _whole_box

    from flare23.inference.engine import EngineNetworks

    events = []

    class Released:
        def __init__(self, name, net):
            self.name, self.net = name, net

        def __call__(self, x):
            events.append((self.name, "window"))
            return self.net(x)

        def release_memory(self):
            events.append((self.name, "release"))

    monkeypatch.setattr(EngineNetworks, "network_for", lambda self, name, window, net, *a, **k: Released(name, net))
    _whole_box(monkeypatch)
    _segment(_body_phantom(), _Organs(1.0), _Organs(1.0, hot=14))
    order = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]
    assert order == [("organ", "window"), ("organ", "release"), ("tumor", "window"), ("tumor", "release")]


def test_a_compiled_networks_pytorch_weights_are_freed_and_it_is_never_compiled_again(tmp_path):
    """``release_torch``: the module's 125 MB (paper widths) go once OpenVINO holds its copy; a second use fails loudly."""
    from flare23.inference.engine import EngineNetworks

    net = fine(seed=3)
    x = torch.randn(1, 1, *WINDOW)
    with torch.no_grad():
        expected = torch.softmax(net(x), 1)
    engines = EngineNetworks("openvino", tmp_path, release_torch=True)
    run = engines.network_for("organ", WINDOW, net, "cpu")
    assert sum(p.numel() for p in net.parameters()) == 0 and all(b.numel() == 0 for b in net.buffers())
    assert engines.network_for("organ", WINDOW, net, "cpu") is run  # the same compilation for every later case
    torch.testing.assert_close(torch.softmax(run(x), 1), expected, atol=PROB_ATOL, rtol=0)
    with pytest.raises(Flare23Error, match="freed after its OpenVINO compilation"):
        engines.network_for("organ", (64, 64, 48), net, "cpu")  # its digest would be that of no weights
    with pytest.raises(Flare23Error, match="freed after its OpenVINO compilation"):
        EngineNetworks("torch").network_for("organ", WINDOW, net, "cpu")
    with pytest.raises(RuntimeError):
        net(x)
    # another inferer given the same module (MONAI Label re-parsing its config) finds the compilation kept with the module
    assert EngineNetworks("openvino", tmp_path, release_torch=True).network_for("organ", WINDOW, net, "cpu") is run
    kept = fine(seed=3)  # without release_torch (flare23 calibrate compares the module with its int8 network) nothing is freed
    EngineNetworks("openvino", tmp_path).network_for("organ", WINDOW, kept, "cpu")
    assert sum(p.numel() for p in kept.parameters()) == sum(p.numel() for p in fine().parameters())


def test_a_new_network_never_gets_the_compilation_of_a_gone_one(tmp_path):
    """Compilations live with their module (weakly): a network made after another was dropped (MONAI Label builds a new
    one when model.pt changes; CPython may give it the old one's address) is compiled from its own weights."""
    import gc

    from flare23.inference.engine import _COMPILATIONS, EngineNetworks

    engines = EngineNetworks("openvino", tmp_path)
    x = torch.randn(1, 1, *WINDOW)
    old = fine(seed=4)
    engines.network_for("organ", WINDOW, old, "cpu")
    held = len(_COMPILATIONS)
    del old
    gc.collect()
    assert len(_COMPILATIONS) <= held - 1  # gone with its module (and others of earlier tests that gc collected)
    new = fine(seed=6)
    run = engines.network_for("organ", WINDOW, new, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(run(x), 1), torch.softmax(new(x), 1), atol=PROB_ATOL, rtol=0)


def test_the_cascade_compiles_both_fine_networks_before_its_first_window_and_frees_their_weights(monkeypatch, tmp_path):
    """Both freed before the organ branch's peak; later cases run on the compilations and give the same labels."""
    from monai.data import MetaTensor
    from test_window_skip import _body_phantom, _branch, _Const, _whole_box

    from flare23.inference import engine as engine_module
    from flare23.inference.branches import CascadeNetworks
    from flare23.inference.cascade import CascadeInferer

    _whole_box(monkeypatch)
    x = MetaTensor(_body_phantom()[None, None], affine=torch.diag(torch.tensor([3.0, 3.0, 4.0, 1.0])))

    def segment(engine, cases=1):
        organ, tumor = fine(seed=1), fine(TUMOR_STRIDES_XYZ, seed=2)
        inferer = CascadeInferer(tumor=_branch("tumor", (4.0, 4.0, 6.0), patch=WINDOW), organ=_branch("organ", (3.0, 3.0, 5.0), patch=WINDOW),
                                 precision="fp32", postprocessing=False, engine=engine, engine_cache=str(tmp_path))  # fmt: skip
        nets = CascadeNetworks(roi=_Const(2, 1), organ=organ, tumor=tumor).eval()
        freed = []
        real = inferer._labels

        def labels(branch, *a, **k):  # what is freed when each branch's windows start
            freed.append({n: sum(p.numel() for p in m.parameters()) == 0 for n, m in (("organ", organ), ("tumor", tumor))})
            return real(branch, *a, **k)

        inferer._labels = labels
        return [inferer(x, nets)[0, 0] for _ in range(cases)], freed

    (reference,), kept = segment("torch")
    (first, second), freed = segment("openvino", cases=2)
    assert all(not any(f.values()) for f in kept)  # PyTorch runs the modules: nothing freed
    assert all(all(f.values()) for f in freed) and len(freed) == 4  # both freed from the first organ window on
    assert torch.equal(first, second)
    monkeypatch.setattr(engine_module, "release_weights", lambda module: None)
    (unfreed,), still = segment("openvino")
    assert not any(still[0].values())
    assert torch.equal(first, unfreed)  # freeing changes nothing in what runs
    assert len(torch.unique(reference)) > 2
    # random tiny weights leave classes near ties: 56 of 34 560 voxels differ, before this change as after it
    agreement = float((first == reference).float().mean())
    assert agreement >= 0.998, agreement


def test_the_cache_is_used_then_rebuilt_when_the_weights_change(organ, tmp_path):
    net, folder, first = organ
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    second = OpenVinoNetwork(net, WINDOW, tmp_path, name="organ", threads=1)  # the fixture's thread count: equal results
    assert not second.converted
    x = torch.randn(1, 1, *WINDOW)
    torch.testing.assert_close(first(x), second(x), atol=0, rtol=0)
    retrained = fine(seed=5)  # other weights: another key, converted, and its own results
    assert weights_digest(retrained) != weights_digest(net)
    third = OpenVinoNetwork(retrained, WINDOW, tmp_path, name="organ")
    assert third.converted
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(third(x), 1), torch.softmax(retrained(x), 1), atol=PROB_ATOL, rtol=0)
    other_window = OpenVinoNetwork(net, (64, 64, 64), tmp_path, name="organ")
    assert other_window.converted
    assert len(list(tmp_path.glob("organ-*.json"))) == 3


def test_the_same_weights_in_another_architecture_are_never_served_from_the_cache(organ, tmp_path):
    """Weights do not show an activation's slope: a cache keyed by weights alone would run the wrong network."""
    net, folder, _ = organ
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    torch.manual_seed(0)
    other = NnDynUNet(spatial_dims=3, in_channels=1, out_channels=15, kernel_size=KERNELS_XYZ, strides=ORGAN_STRIDES_XYZ,
                      upsample_kernel_size=ORGAN_STRIDES_XYZ[1:], filters=[4, 8, 8, 8, 8, 8], norm_name="instance",
                      act_name=("leakyrelu", {"negative_slope": 0.3, "inplace": True}), deep_supervision=False).eval()  # fmt: skip
    other.load_state_dict(net.state_dict())
    assert weights_digest(other) == weights_digest(net)
    engine = OpenVinoNetwork(other, WINDOW, tmp_path, name="organ")
    assert engine.converted
    x = torch.randn(1, 1, *WINDOW)
    with torch.no_grad():
        assert not torch.allclose(other(x), net(x), atol=1e-3)  # the two networks do differ
        torch.testing.assert_close(torch.softmax(engine(x), 1), torch.softmax(other(x), 1), atol=PROB_ATOL, rtol=0)


def test_a_recorded_class_and_the_class_its_overrides_build_share_one_conversion(tmp_path):
    """The CLI builds a checkpoint's recorded ``NativeHeadsDynUNet``; a run that types the same ``network_def``
    overrides builds MONAI's ``DynUNet``. Same modules, weights and inference output: one cache entry, not two."""
    from monai.networks.nets import DynUNet

    from flare23.inference.engine import structure_digest
    from flare23.models.networks import NativeHeadsDynUNet

    args = dict(spatial_dims=3, in_channels=1, out_channels=15, kernel_size=KERNELS_XYZ, strides=ORGAN_STRIDES_XYZ,
                upsample_kernel_size=ORGAN_STRIDES_XYZ[1:], filters=[4, 8, 8, 8, 8, 8], norm_name="instance")  # fmt: skip
    torch.manual_seed(0)
    recorded = NativeHeadsDynUNet(**args).eval()
    typed = DynUNet(**args).eval()
    typed.load_state_dict(recorded.state_dict())
    x = torch.randn(1, 1, *WINDOW)
    with torch.no_grad():
        assert torch.equal(recorded(x), typed(x))  # why they may share: the same inference output
    assert structure_digest(recorded) == structure_digest(typed)
    assert OpenVinoNetwork(recorded, WINDOW, tmp_path, name="organ", threads=1).converted
    again = OpenVinoNetwork(typed, WINDOW, tmp_path, name="organ", threads=1)
    assert not again.converted and len(list(tmp_path.glob("organ-*.json"))) == 1
    torch.manual_seed(0)
    nn_kernels = NnDynUNet(**args).eval()  # nnU-Net's decoder kernels: another network, another entry
    assert structure_digest(nn_kernels) != structure_digest(recorded)


@pytest.mark.parametrize("damage", ["truncate_bin", "other_version", "delete_bin"])
def test_a_damaged_or_stale_cache_is_rebuilt_never_trusted(organ, tmp_path, damage):
    net, folder, _ = organ
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    (record,) = tmp_path.glob("organ-*.json")
    xml, binary = record.with_suffix(".xml"), record.with_suffix(".bin")
    if damage == "truncate_bin":
        binary.write_bytes(binary.read_bytes()[: binary.stat().st_size // 2])
    elif damage == "flip_byte_xml":
        data = bytearray(xml.read_bytes())
        data[len(data) // 2] ^= 0xFF
        xml.write_bytes(bytes(data))
    elif damage == "other_version":
        r = json.loads(record.read_text())
        r["key"]["openvino"] = "0.0.0"
        record.write_text(json.dumps(r))
    else:
        binary.unlink()
    with pytest.warns(UserWarning, match="OpenVINO cache not usable"):
        again = OpenVinoNetwork(net, WINDOW, tmp_path, name="organ")
    assert again.converted
    x = torch.randn(2, 1, *WINDOW)
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(again(x), 1), torch.softmax(net(x), 1), atol=PROB_ATOL, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: the next run reads it silently
        assert not OpenVinoNetwork(net, WINDOW, tmp_path, name="organ").converted


def test_the_cache_sits_beside_the_checkpoint_or_in_the_users_cache(tmp_path, monkeypatch):
    ckpt = tmp_path / "models" / "model.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    assert cache_dir_for(ckpt) == ckpt.parent / CACHE_FOLDER
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    if os.geteuid() != 0:  # root writes into read-only folders
        ckpt.parent.chmod(0o555)
        try:
            assert cache_dir_for(ckpt) == tmp_path / "home" / ".cache" / "flare23" / "openvino"
        finally:
            ckpt.parent.chmod(0o755)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir_for(None) == tmp_path / "home" / ".cache" / "flare23" / "openvino"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir_for(None) == tmp_path / "xdg" / "flare23" / "openvino"


def test_engine_choice():
    assert resolve_engine("auto", "cpu") == "openvino"
    assert resolve_engine("auto", "cuda") == "torch"
    assert resolve_engine("torch", "cpu") == "torch"
    with pytest.raises(Flare23Error, match="CPU only"):
        resolve_engine("openvino", "cuda")
    with pytest.raises(Flare23Error, match="not one of"):
        resolve_engine("tensorrt", "cpu")


def test_a_window_of_another_size_is_refused(organ):
    engine = organ[2]
    with pytest.raises(ValueError, match="compiled for"):
        engine(torch.zeros(1, 1, 64, 64, 64))


# --- the engine inside the cascade: flare23 segment --engine ------------------------------------------------------------
def test_segment_with_openvino_gives_the_labels_of_pytorch_and_caches_beside_the_checkpoints(phantom, checkpoints, tmp_path):  # noqa: F811
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np
    from test_pipeline_bundle import _env, _tiny_args

    args = [a for a in _tiny_args() if a not in ("--load_pretrain", "false")]
    for part in ("roi", "organ", "tumor"):
        args += [f"--{part}_ckpt", str(checkpoints[part])]
    cache = checkpoints["organ"].parent / CACHE_FOLDER
    labels, listing = {}, []
    for run, engine in enumerate(("torch", "openvino", "openvino")):
        out = tmp_path / f"{run}_{engine}" / "seg.nii.gz"
        r = subprocess.run([sys.executable, "-m", "flare23", "segment", "-i", str(phantom / "a.1.nii.gz"), "-o", str(out),
                            "--engine", engine, *args], capture_output=True, text=True, env=_env(), timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        labels[run] = np.asarray(nib.load(str(out)).dataobj)
        timings = (out.parent / "seg_timings.csv").read_text().splitlines()[0].split(",")
        assert ("organ_convert" in timings and "tumor_convert" in timings) == (engine == "openvino")
        if engine == "openvino":
            listing.append(sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir()))
    assert len(listing[0]) == 6  # organ and tumor: xml, bin, record
    assert listing[1] == listing[0]  # the second run read the cache and wrote nothing
    assert np.array_equal(labels[1], labels[2])
    agreement = float((labels[0] == labels[1]).mean())
    assert agreement >= 0.999, agreement
