"""Deployment export: ONNX of each network through ``monai.bundle onnx_export``, checked with onnxruntime.

The three networks (LightUNet of roi_extractor, the residual DynUNets of organ_seg and tumor_seg),
tiny widths, random-init checkpoints in ``tmp_path``. Each is exported with dynamic batch and
spatial axes, and onnxruntime's output must equal the PyTorch network's at the export size and at
another size. TorchScript export (``ckpt_export``) is covered by ``tests/test_conformance.py``.

The exporter: torch 2.13's default ``torch.onnx.export`` is the dynamo (``torch.export``) exporter,
which takes about 30 s of CPU per network here; the TorchScript-based exporter
(``converter_kwargs: {'dynamo': False}``) takes about 3 s. Every network goes through the fast one,
and the ROI network also through the default one (the README shows the default command).
The commands run in this process through ``fire``, with the argument list of
``python -m monai.bundle onnx_export`` (see tests/test_conformance.py).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import fire
import onnx  # noqa: F401  (requirements-test.txt: a missing exporter dependency fails, never skips)
import onnxruntime
import onnxscript  # noqa: F401  (torch's default dynamo exporter needs it)
import pytest
import torch
from monai.bundle import ConfigParser

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
#: bundle -> (tiny widths, export input shape, a second input shape)
NETWORKS = {
    "roi_extractor": ([4, 8, 8, 8, 8], (32, 32, 32), (48, 32, 64)),
    "organ_seg": ([4, 8, 8, 8, 8, 8], (64, 64, 32), (96, 64, 48)),
    "tumor_seg": ([4, 8, 8, 8, 8, 8], (64, 64, 16), (96, 64, 24)),
}
DYNAMIC = {"input_names": ["image"], "output_names": ["pred"], "dynamic_axes": {"image": [0, 2, 3, 4], "pred": [0, 2, 3, 4]}}


def bundle_cli(*argv: str) -> None:
    main = importlib.import_module("monai.bundle.__main__")
    fire.Fire(
        {n: getattr(main, n) for n in dir(main) if not n.startswith("_") and callable(getattr(main, n))}, command=list(argv)
    )


def export_and_compare(bundle: str, tmp_path: Path, converter: dict) -> None:
    filters, shape, other = NETWORKS[bundle]
    config = ROOT / "bundles" / bundle / "configs" / "inference.json"
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["network_def"]["filters"] = filters
    net = parser.get_parsed_content("network_def", lazy=False).eval()
    ckpt, onnx_file = tmp_path / "model.pt", tmp_path / "model.onnx"
    torch.save(net.state_dict(), ckpt)
    bundle_cli("onnx_export", "network_def", "--filepath", str(onnx_file), "--ckpt_file", str(ckpt),
               "--meta_file", str(config.parent / "metadata.json"), "--config_file", str(config),
               "--bundle_root", str(config.parents[1]), "--network_def#filters", json.dumps(filters),
               "--input_shape", json.dumps([1, 1, *shape]), "--converter_kwargs", repr(converter))  # fmt: skip
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for size, batch in ((shape, 1), (other, 2)):
        x = torch.randn(batch, 1, *size)
        with torch.no_grad():
            expected = net(x)
        (got,) = session.run(["pred"], {"image": x.numpy()})
        assert got.shape == tuple(expected.shape)
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)
        # and the class decision is the same wherever the top two logits are not a near tie
        top2 = expected.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3
        assert torch.equal(torch.from_numpy(got).argmax(1)[clear], expected.argmax(1)[clear])


@pytest.mark.parametrize("bundle", sorted(NETWORKS))
def test_onnx_export_matches_pytorch(bundle, tmp_path):
    export_and_compare(bundle, tmp_path, {**DYNAMIC, "dynamo": False})


@pytest.mark.slow
def test_onnx_export_with_the_default_dynamo_exporter(tmp_path):
    export_and_compare("roi_extractor", tmp_path, DYNAMIC)
