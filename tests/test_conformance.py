"""Model Zoo conformance of the four bundles (one parametrized test per check, over every bundle).

For each bundle: ``metadata.json`` validates offline against ``../shared/schemas`` (with
``jsonschema`` and with ``monai.bundle verify_metadata``, the network blocked), its ``version`` is a
key of ``changelog``, ``monai.bundle verify_net_in_out`` passes with the shape and dtype that the
metadata states, ``monai.bundle ckpt_export`` writes a TorchScript file that loads and gives the
eager network's output, and ``ConfigWorkflow.check_properties()`` is empty for every config file.

The pipeline bundle has no network of its own: its ``network_def`` (``CascadeNetworks``) holds the
three sub-bundles' networks, built from their configs by ``flare23.bundles.SubBundle``. Its
metadata describes the whole cascade (an int16 CT of any size in, a uint8 label map out), which is
not the input and output of any one network. So for the pipeline, ``verify_net_in_out`` and
``ckpt_export`` run on the pipeline's own ``inference.json`` with the net ids
``network_def::roi``, ``network_def::organ`` and ``network_def::tumor`` (the networks exactly as the
pipeline builds them, with its ``*_overrides``), each checked against the metadata of the bundle
that defines it. (``::`` is MONAI's other id separator; on the command line ``fire`` would read
``#roi`` in a positional value as a Python comment and silently drop it.)

The ``monai.bundle`` commands run in this process through ``fire`` with the same argument list
as ``python -m monai.bundle ...`` (the module's ``__main__`` is ``fire.Fire()`` over the same
functions); a separate interpreter per command would cost about 10 s of CPU each. The
``python -m monai.bundle`` entry point itself is exercised by the torchrun tests.
"""

from __future__ import annotations

import importlib
import json
import shutil
import urllib.request
from pathlib import Path

import fire
import jsonschema
import monai
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ("roi_extractor", "organ_seg", "tumor_seg", "pipeline")
ROI_TINY = [4, 8, 8, 8, 8]
FINE_TINY = [4, 8, 8, 8, 8, 8]
PIPELINE_TINY = {
    "roi_overrides": {"network_def#filters": ROI_TINY},
    "organ_overrides": {"network_def#filters": FINE_TINY},
    "tumor_overrides": {"network_def#filters": FINE_TINY},
}
#: bundle -> [(net id in the bundle's inference.json, bundle whose metadata describes that network, test input shape)]
NETWORKS = {
    "roi_extractor": [("network_def", "roi_extractor", (32, 32, 32))],
    "organ_seg": [("network_def", "organ_seg", (64, 64, 32))],
    "tumor_seg": [("network_def", "tumor_seg", (64, 64, 16))],
    "pipeline": [
        ("network_def::roi", "roi_extractor", (32, 32, 32)),
        ("network_def::organ", "organ_seg", (64, 64, 32)),
        ("network_def::tumor", "tumor_seg", (64, 64, 16)),
    ],
}
#: every config file of a bundle and the combinations (with their workflow type) that check_properties covers
CONFIG_SETS = {
    "roi_extractor": [
        (["train.json"], "train"),
        (["train.json", "evaluate.json"], "train"),
        (["inference.json"], "infer"),
        (["train.json", "multi_gpu_train.json"], "train"),
        (["train.json", "evaluate.json", "multi_gpu_evaluate.json"], "train"),
    ],
    "pipeline": [
        (["inference.json"], "infer"),
        (["inference.json", "evaluate.json"], "infer"),
        (["inference.json", "multi_gpu_inference.json"], "infer"),
        (["inference.json", "evaluate.json", "multi_gpu_evaluate.json"], "infer"),
    ],
}
for _fine in ("organ_seg", "tumor_seg"):
    CONFIG_SETS[_fine] = CONFIG_SETS["roi_extractor"] + [(["train.json", "finetune.json"], "train"), (["train.json", "train_cpu.json"], "train")]


def configs(bundle: str) -> Path:
    return ROOT / "bundles" / bundle / "configs"


def bundle_cli(*argv: str) -> None:
    """``python -m monai.bundle ARGV`` in this process: ``fire`` over the ``monai.bundle.__main__`` names."""
    main = importlib.import_module("monai.bundle.__main__")
    fire.Fire(
        {n: getattr(main, n) for n in dir(main) if not n.startswith("_") and callable(getattr(main, n))}, command=list(argv)
    )


def overrides(bundle: str) -> list[str]:
    """Tiny widths as command-line overrides (the CLI reads Python literals)."""
    if bundle == "pipeline":
        return [x for k, v in PIPELINE_TINY.items() for x in (f"--{k}", repr(v))]
    return ["--network_def#filters", json.dumps(ROI_TINY if bundle == "roi_extractor" else FINE_TINY)]


def export_mode(meta_bundle: str, shape) -> list[str]:
    """How ``ckpt_export`` converts each network (the README's commands do the same).

    LightUNet is scripted. DynUNet with deep supervision cannot be scripted (its training branch
    assigns into an ``Optional[List[Tensor]]``), and switching deep supervision off would drop the
    heads that a trained checkpoint holds (the export loads strictly), so DynUNet is traced in eval
    mode; the test then checks the traced model at a second input size too.
    """
    if meta_bundle == "roi_extractor":
        return []
    return ["--use_trace", "True", "--input_shape", json.dumps([1, 1, *shape])]


def tiny_network(bundle: str, net_id: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(configs(bundle) / "inference.json"))
    parser["bundle_root"] = str(ROOT / "bundles" / bundle)
    if bundle == "pipeline":
        for k, v in PIPELINE_TINY.items():
            parser[k] = v
    else:
        parser["network_def"]["filters"] = ROI_TINY if bundle == "roi_extractor" else FINE_TINY
    return parser.get_parsed_content(net_id, lazy=False).eval()


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_validates_offline_and_version_is_in_changelog(bundle, shared_dir, tmp_path, monkeypatch):
    meta_file = configs(bundle) / "metadata.json"
    meta = json.loads(meta_file.read_text())
    for name in ("meta_schema_20240725.json",):
        jsonschema.validate(meta, json.loads((shared_dir / "schemas" / name).read_text()))
    assert meta["schema"].endswith("/meta_schema_20240725.json")
    assert meta["version"] in meta["changelog"]
    assert "optional_packages_version" not in meta  # one requirements key (the deprecated one made MONAI warn)
    assert meta["monai_version"] == monai.__version__ and torch.__version__.startswith(meta["pytorch_version"])

    # MONAI's own check, offline: the schema is the local copy, and any download attempt fails the test
    def no_network(*args, **kwargs):
        raise AssertionError(f"verify_metadata tried to download: {args}")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(importlib.import_module("monai.apps.utils"), "urlretrieve", no_network, raising=False)
    schema = tmp_path / "meta_schema_20240725.json"
    shutil.copy(shared_dir / "schemas" / schema.name, schema)
    bundle_cli("verify_metadata", "--meta_file", str(meta_file), "--filepath", str(schema))
    # and it does reject a broken metadata file (the check can fail)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({k: v for k, v in meta.items() if k != "network_data_format"}))
    with pytest.raises(ValueError, match="network_data_format"):
        bundle_cli("verify_metadata", "--meta_file", str(broken), "--filepath", str(schema))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_net_in_out_and_torchscript_export(bundle, tmp_path):
    common = [
        "--config_file",
        str(configs(bundle) / "inference.json"),
        "--bundle_root",
        str(ROOT / "bundles" / bundle),
        *overrides(bundle),
    ]
    for net_id, meta_bundle, shape in NETWORKS[bundle]:
        meta_file = str(configs(meta_bundle) / "metadata.json")
        fmt = json.loads(Path(meta_file).read_text())["network_data_format"]
        assert fmt["inputs"]["image"]["dtype"] == fmt["outputs"]["pred"]["dtype"] == "float32"
        # input and output channels, dtype and spatial shape as the metadata states them (the sub-bundles'
        # full patch sizes are checked by their own case: the pipeline's case uses the small test shape)
        small = (
            ["--_meta_#network_data_format#inputs#image#spatial_shape", json.dumps(list(shape))] if bundle == "pipeline" else []
        )
        bundle_cli("verify_net_in_out", net_id, "--meta_file", meta_file, "--device", "cpu", "--n", "2", *common, *small)
        if bundle == "roi_extractor":  # the check can fail: a wrong output channel count in the metadata is caught
            with pytest.raises(ValueError, match="output channel number"):
                bundle_cli("verify_net_in_out", net_id, "--meta_file", meta_file, "--device", "cpu", "--n", "2", *common,
                           "--_meta_#network_data_format#outputs#pred#num_channels", "3")  # fmt: skip

        # TorchScript export of a random-init checkpoint of the tiny network
        net = tiny_network(bundle, net_id)
        ckpt = tmp_path / f"{net_id.replace(':', '_')}.pt"
        torch.save(net.state_dict(), ckpt)
        ts_file = tmp_path / f"{net_id.replace(':', '_')}.ts"
        bundle_cli("ckpt_export", net_id, "--filepath", str(ts_file), "--ckpt_file", str(ckpt), "--meta_file", meta_file,
                   *common, *export_mode(meta_bundle, shape))  # fmt: skip
        extra = {"metadata.json": "", "inference.json": ""}
        scripted = torch.jit.load(str(ts_file), map_location="cpu", _extra_files=extra).eval()
        assert json.loads(extra["metadata.json"])["version"] == json.loads(Path(meta_file).read_text())["version"]
        assert "network_def" in json.loads(extra["inference.json"])
        for size in (shape, [2 * s for s in shape[:2]] + [shape[2] // 2]):  # another valid size than the traced one
            x = torch.randn(1, 1, *size)
            with torch.no_grad():
                expected, got = net(x), scripted(x)
            assert got.shape == (1, fmt["outputs"]["pred"]["num_channels"], *size)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_every_config_file_is_covered():
    for bundle in BUNDLES:
        covered = {f for files, _ in CONFIG_SETS[bundle] for f in files}
        present = {p.name for p in configs(bundle).glob("*.json")} - {"metadata.json"}
        assert covered == present, bundle


@pytest.mark.parametrize("bundle", BUNDLES)
def test_check_properties_is_empty_for_every_config(bundle, tiny_phantoms, tmp_path, dist_env):
    import ignite.distributed as idist

    for files, kind in CONFIG_SETS[bundle]:
        extra = {"output_dir": str(tmp_path / "out"), "dataset_dir": str(tiny_phantoms)}
        if bundle == "pipeline":
            extra.update(PIPELINE_TINY, load_pretrain=False)
            if "evaluate.json" not in files:
                extra["dataset_dir"] = str(tiny_phantoms / "imagesTr")
        else:
            extra.update(num_workers=0, cache_rate=0.0, ckpt_dir=str(tmp_path / "models"))
            if kind == "infer":
                extra.update(dataset_dir=str(tiny_phantoms / "imagesTr"), load_pretrain=False)
            if "finetune.json" in files or "evaluate.json" in files:
                net = tiny_network(bundle, "network_def")
                (tmp_path / "models").mkdir(exist_ok=True)
                torch.save(net.state_dict(), tmp_path / "models" / "model.pt")
                extra["pretrained_ckpt"] = str(tmp_path / "models" / "model.pt") if "finetune.json" in files else ""
        wf = ConfigWorkflow(
            config_file=[str(configs(bundle) / f) for f in files],
            meta_file=str(configs(bundle) / "metadata.json"),
            logging_file=False,
            workflow_type=kind,
            bundle_root=str(ROOT / "bundles" / bundle),
            **extra,
        )
        if bundle != "pipeline":
            wf.parser["network_def"]["filters"] = ROI_TINY if bundle == "roi_extractor" else FINE_TINY
        try:
            wf.initialize()
            assert wf.check_properties() == [], files
        finally:
            wf.finalize()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            idist.sync()  # ignite caches the distributed context: back to serial for the other tests
