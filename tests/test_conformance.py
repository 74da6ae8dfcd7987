"""Model Zoo conformance of the four bundles (one parametrized test per check, over every bundle).

For each bundle: ``metadata.json`` validates offline against ``../shared/schemas`` (with
``jsonschema`` and with ``monai.bundle verify_metadata``, the network blocked), its ``version`` is a
key of ``changelog``, ``monai.bundle verify_net_in_out`` passes with the shape and dtype that the
metadata states, ``monai.bundle ckpt_export`` writes a TorchScript file (by scripting, the Zoo's way)
that loads and gives the eager network's output, and ``ConfigWorkflow.check_properties()`` is empty
for every config file.

The Model Zoo's CI (``ci/verify_bundle.py`` of Project-MONAI/model-zoo) runs, for a bundle
``models/<name>``: ``verify_metadata`` (schema downloaded to ``eval/schema.json``), then
``verify_net_in_out`` and ``ckpt_export`` on ``network_def`` of ``configs/inference.json`` with
``bundle_root`` = the bundle's path and nothing else (so ``ckpt_export`` scripts, and loads
``models/model.pt`` with a strict ``load_state_dict``); its install step is ``pip install`` of
``monai_version``, ``pytorch_version``, ``numpy_version`` and every ``required_packages_version``
entry. :func:`test_model_zoo_checks_run_from_the_bundle_folder` runs those commands with
``python -m monai.bundle`` from the bundle's own folder (``bundle_root`` left to the config: ``.``
there), :func:`test_model_zoo_ci_layout` in the Zoo's layout (``models/<name>``, ``bundle_root``
passed), both with tiny widths and with weights written as a training writes them (the fine
models' deep-supervision heads included). What needs published weights (``models/model.pt``
present, its TorchScript export) is listed in the README's "Model Zoo conformance".

The pipeline bundle's ``network_def`` (``CascadeNetworks``) holds the three sub-bundles' networks,
built from their configs by ``flare23.bundles.SubBundle``; its forward is the organ network, and
that is what its ``network_data_format`` describes (``inputs``/``outputs``: the organ network's,
checked equal to organ_seg's). The cascade end to end (an int16 CT of any size in, a uint8 label
map out) is ``network_data_format.post_processed_outputs`` and ``cascade_data_format``. The
sub-networks are also checked one by one, with the net ids ``network_def::roi``,
``network_def::organ`` and ``network_def::tumor`` against the metadata of the bundle that defines
each. (``::`` is MONAI's other id separator; on the command line ``fire`` would read ``#roi`` in a
positional value as a Python comment and silently drop it.)

The in-process checks call the ``monai.bundle`` commands through ``fire`` with the same argument
list as ``python -m monai.bundle ...`` (the module's ``__main__`` is ``fire.Fire()`` over the same
functions); the from-the-folder checks start ``python -m monai.bundle`` itself (about 5 s each).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from importlib.metadata import requires
from pathlib import Path

import fire
import jsonschema
import monai
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from packaging.requirements import Requirement

from flare23.bundles import bundle_folder
from flare23.errors import Flare23Error
from flare23.inference.branches import CascadeNetworks
from flare23.models.trained import RecordedSettings
from flare23.training.checkpoints import load_weights, unused_head_keys

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
        ("network_def", "pipeline", (64, 64, 32)),
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
        # input and output channels, dtype and spatial shape as the metadata states them (the full patch sizes are
        # checked by each bundle's own case and from the bundle folders below: the pipeline's case uses the small test shape)
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
        bundle_cli("ckpt_export", net_id, "--filepath", str(ts_file), "--ckpt_file", str(ckpt), "--meta_file", meta_file, *common)
        extra = {"metadata.json": "", "inference.json": ""}
        scripted = torch.jit.load(str(ts_file), map_location="cpu", _extra_files=extra).eval()
        assert json.loads(extra["metadata.json"])["version"] == json.loads(Path(meta_file).read_text())["version"]
        assert "network_def" in json.loads(extra["inference.json"])
        for size in (shape, [2 * s for s in shape[:2]] + [shape[2] // 2]):  # and another valid size
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
                net = training_network(bundle)  # the weights a training writes (the fine models' with their heads)
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


# --- the Model Zoo's own checks, run the way its CI runs them --------------------------------------------------------
#: a dead proxy: a download attempt (verify_metadata's schema) fails instead of reaching the network
OFFLINE = {k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
#: the test input size of each bundle's network_def (divisible by its strides) and a second one
SHAPES = {"roi_extractor": ((32, 32, 32), (48, 32, 64)), "organ_seg": ((64, 64, 32), (96, 64, 48)),
          "tumor_seg": ((64, 64, 16), (96, 64, 24)), "pipeline": ((64, 64, 32), (96, 64, 48))}  # fmt: skip
SUB = {"roi_extractor": "roi", "organ_seg": "organ", "tumor_seg": "tumor"}


def training_network(bundle: str) -> torch.nn.Module:
    """The tiny network as the bundle's ``train.json`` builds it (the fine models with their deep-supervision heads), in eval mode."""
    parser = ConfigParser()
    parser.read_config(str(configs(bundle) / "train.json"))
    parser["bundle_root"] = str(ROOT / "bundles" / bundle)
    parser["network_def"]["filters"] = ROI_TINY if bundle == "roi_extractor" else FINE_TINY
    return parser.get_parsed_content("network_def", lazy=False).eval()


def trained_network(bundle: str) -> torch.nn.Module:
    """What a training gives each bundle: the pipeline's is the three trained networks in one ``CascadeNetworks``."""
    if bundle == "pipeline":
        return CascadeNetworks(*(training_network(b) for b in SUB)).eval()
    return training_network(bundle)


def has_heads(state: dict) -> bool:
    return any(".deep_supervision_heads." in f".{k}" for k in state)


def zoo_command(folder: Path, *argv: str) -> str:
    """``python -m monai.bundle ARGV`` in ``folder``, offline; its output (the command must succeed)."""
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *argv], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"python -m monai.bundle {' '.join(argv)} (in {folder}):\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts}


def same_output(net: torch.nn.Module, ts_file: Path, shapes) -> None:
    """The TorchScript module in ``ts_file`` gives ``net``'s output (the eager network the weights came from)."""
    scripted = torch.jit.load(str(ts_file), map_location="cpu").eval()
    for shape in shapes:
        x = torch.randn(1, 1, *shape)
        with torch.no_grad():
            expected, got = net(x), scripted(x)
        assert got.shape == expected.shape and got.shape[1] in (2, 15)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_model_zoo_checks_run_from_the_bundle_folder(bundle, shared_dir, tmp_path):
    """``verify_metadata``, ``verify_net_in_out`` and ``ckpt_export`` (scripting) as the Zoo runs them, from ``bundles/<name>``.

    ``bundle_root`` is left to the config (``.`` in the bundle's folder; the pipeline reaches its siblings from
    there), the network is the metadata's (its full patch size, tiny widths), and the weights are a training's:
    the fine models' include the deep-supervision heads that the inference network is built without.
    """
    folder = ROOT / "bundles" / bundle
    before = files_under(folder)
    schema = tmp_path / "schema.json"  # the Zoo's CI downloads it to eval/schema.json first (ci/prepare_schema.py)
    shutil.copy(shared_dir / "schemas" / "meta_schema_20240725.json", schema)
    out = zoo_command(folder, "verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(schema))
    assert "metadata is verified with no error" in out

    base = ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json", *overrides(bundle)]
    out = zoo_command(folder, "verify_net_in_out", "network_def", *base, "--device", "cpu")
    assert "data shape of network is verified with no error" in out

    net = trained_network(bundle)
    state = net.state_dict()
    assert has_heads(state) == (bundle != "roi_extractor")
    ckpt, ts_file = tmp_path / "model.pt", tmp_path / "verify_model.ts"
    torch.save(state, ckpt)
    zoo_command(folder, "ckpt_export", "network_def", "--filepath", str(ts_file), "--ckpt_file", str(ckpt), *base)
    same_output(net, ts_file, SHAPES[bundle])
    assert files_under(folder) == before  # nothing written into the bundle


def test_model_zoo_ci_layout(shared_dir, tmp_path, monkeypatch):
    """The four bundles as ``models/<name>`` of a Zoo checkout, the CI's calls from its root with ``bundle_root="models/<name>"``.

    ``models/model.pt`` stands for published weights (``large_files.yml``): each is written as a training writes
    it (``{"model": weights, "settings": ...}``, tiny widths recorded in the settings, the fine models' heads
    included; the pipeline's packed as by ``flare23 pack``), so the calls take no override at all, as in the CI,
    and ``ckpt_export`` loads it without ``key_in_ckpt``.
    """
    zoo = tmp_path / "zoo"
    schema = shared_dir / "schemas" / "meta_schema_20240725.json"
    nets = {}
    for bundle in BUNDLES:
        shutil.copytree(ROOT / "bundles" / bundle, zoo / "models" / bundle, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
        (zoo / "models" / bundle / "models").mkdir()
        (zoo / "models" / bundle / "eval").mkdir()
        shutil.copy(schema, zoo / "models" / bundle / "eval" / "schema.json")
        nets[bundle] = trained_network(bundle)
        if bundle != "pipeline":
            settings = RecordedSettings(zoo / "models" / bundle, SUB[bundle], nets[bundle], {}).state_dict()
            torch.save({"model": nets[bundle].state_dict(), "settings": settings}, zoo / "models" / bundle / "models" / "model.pt")
    parts = {SUB[b]: torch.load(zoo / "models" / b / "models" / "model.pt", weights_only=True)["settings"] for b in SUB}
    torch.save({"model": nets["pipeline"].state_dict(), "settings": {"parts": parts}}, zoo / "models" / "pipeline" / "models" / "model.pt")
    monkeypatch.chdir(zoo)
    for bundle in BUNDLES:
        path = f"models/{bundle}"
        meta, config = f"{path}/configs/metadata.json", f"{path}/configs/inference.json"
        for name in ("LICENSE", "configs/metadata.json", "configs/inference.json", "models/model.pt"):  # necessary and preferred files
            assert (zoo / path / name).is_file(), name
        bundle_cli("verify_metadata", "--meta_file", meta, "--filepath", f"{path}/eval/schema.json")
        bundle_cli("verify_net_in_out", "network_def", "--meta_file", meta, "--config_file", config, "--bundle_root", path, "--device", "cpu")
        bundle_cli("ckpt_export", "network_def", "--filepath", f"{path}/models/verify_model.ts", "--ckpt_file", f"{path}/models/model.pt",
                   "--meta_file", meta, "--config_file", config, "--bundle_root", path)  # fmt: skip
        same_output(nets[bundle], zoo / path / "models" / "verify_model.ts", SHAPES[bundle][:1])


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_requirements_install_in_a_fresh_environment(bundle):
    """What the Zoo's CI installs: only packages a registry serves, pinned, consistent with the project's requirements.

    ``required_packages_version`` is the flare23 package's own runtime dependencies (pyproject.toml) less those with
    their own keys (``monai_version``, ``pytorch_version``, ``numpy_version``), each pinned to a version that the
    project's requirements allow; flare23 itself is installed from the repository (README, "Model Zoo conformance").
    """
    meta = json.loads((configs(bundle) / "metadata.json").read_text())
    installed = [Requirement(r) for r in requires("flare23")]  # what pip installs with flare23 (pyproject.toml's dependencies)
    wanted = {r.name.lower(): r for r in installed if r.marker is None}
    pinned = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"]}
    listed = {name.lower(): version for name, version in meta["required_packages_version"].items()}
    assert "flare23" not in listed and "optional_packages_version" not in meta
    assert set(listed) == set(wanted) - set(pinned)
    for name, version in {**listed, **pinned}.items():
        assert version.count(".") >= 1 and version[0].isdigit(), (name, version)
        assert wanted[name].specifier.contains(version), f"{name}=={version} is not allowed by pyproject.toml's {wanted[name]}"
    requirements = {Requirement(line).name.lower(): Requirement(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith(("#", "-"))}  # fmt: skip
    assert all(requirements[n].specifier.contains(v) for n, v in {**listed, **pinned}.items())


# --- the pipeline's network and metadata --------------------------------------------------------------------------------
def test_the_pipeline_metadata_describes_its_network_and_the_cascade_elsewhere():
    pipeline = json.loads((configs("pipeline") / "metadata.json").read_text())
    organ = json.loads((configs("organ_seg") / "metadata.json").read_text())["network_data_format"]
    fmt = pipeline["network_data_format"]
    assert fmt["inputs"] == organ["inputs"] and fmt["outputs"] == organ["outputs"]  # CascadeNetworks.forward is the organ network
    cascade = pipeline["cascade_data_format"]
    assert cascade["outputs"] == fmt["post_processed_outputs"]
    image, pred = cascade["inputs"]["image"], cascade["outputs"]["pred"]
    assert (image["dtype"], image["num_channels"], image["spatial_shape"]) == ("int16", 1, ["*", "*", "*"])
    assert (pred["dtype"], pred["num_channels"], pred["value_range"]) == ("uint8", 1, [0, 14])
    assert pred["channel_def"] == fmt["outputs"]["pred"]["channel_def"]  # MONAI Label's label names are unchanged
    net = tiny_network("pipeline", "network_def")
    x = torch.randn(1, 1, 64, 64, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net.organ(x))


# --- bundle_root ---------------------------------------------------------------------------------------------------------
def test_bundle_root_is_the_bundle_folder_from_the_folder_the_repository_root_and_elsewhere(tmp_path, monkeypatch):
    import flare23.bundles

    bundles = ROOT / "bundles"
    for bundle in BUNDLES:
        assert bundle_folder(bundle, cwd=bundles / bundle) == "."
        assert bundle_folder(bundle, cwd=ROOT) == f"bundles/{bundle}"
        assert bundle_folder(bundle, cwd=tmp_path) == str(bundles / bundle)  # beside the installed package (this clone)
    # another project's layout under the working directory comes first; a folder of the same name without configs is not a bundle
    (tmp_path / "bundles" / "organ_seg" / "configs").mkdir(parents=True)
    (tmp_path / "bundles" / "organ_seg" / "configs" / "metadata.json").write_text("{}")
    assert bundle_folder("organ_seg", cwd=tmp_path) == "bundles/organ_seg"
    assert bundle_folder("organ_seg", cwd=tmp_path / "bundles" / "organ_seg") == "."
    (tmp_path / "tumor_seg").mkdir()
    monkeypatch.setattr(flare23.bundles, "PACKAGE_BUNDLES_DIR", tmp_path / "nowhere")
    assert bundle_folder("tumor_seg", cwd=tmp_path / "tumor_seg") == "."  # nothing found: MONAI's own default

    # the configs: from the repository root (the README's commands) and from the bundle's folder (the Zoo's)
    monkeypatch.undo()
    for cwd, expected in ((ROOT, "bundles/{}"), (bundles / "pipeline", ".")):
        monkeypatch.chdir(cwd)
        for bundle in BUNDLES:
            for name in ("train.json", "inference.json"):
                if not (configs(bundle) / name).is_file():
                    continue
                parser = ConfigParser()
                parser.read_config(str(configs(bundle) / name))
                root = parser.get_parsed_content("bundle_root")
                if bundle == "pipeline" or cwd == ROOT:
                    assert root == expected.format(bundle), (cwd, bundle, name)
                assert (Path(root) / "configs" / name).resolve() == (configs(bundle) / name).resolve()
        parser = ConfigParser()
        parser.read_config(str(configs("pipeline") / "inference.json"))
        for sub in ("roi", "organ", "tumor"):  # the pipeline reaches its siblings relative to its own bundle_root
            assert Path(parser.get_parsed_content(f"{sub}_bundle")) == bundles / {"roi": "roi_extractor"}.get(sub, f"{sub}_seg")


def test_a_copied_bundle_run_by_its_config_file_uses_its_own_folder_and_siblings(tmp_path):
    """``python -m monai.bundle run --config_file <copy>/pipeline/configs/inference.json`` from anywhere: the copy's
    folder, never the project's bundles beside the package (which would segment with other sub-bundle configs)."""
    import shutil

    copy = tmp_path / "my bundles"
    for bundle in BUNDLES:
        shutil.copytree(ROOT / "bundles" / bundle / "configs", copy / bundle / "configs")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    config = copy / "pipeline" / "configs" / "inference.json"
    for value in (str(config), f"['{config}', '{copy / 'pipeline' / 'configs' / 'evaluate.json'}']"):
        argv = ["run", "evaluating", "--config_file", value, "--dataset_dir", "x"]
        assert bundle_folder("pipeline", cwd=elsewhere, argv=argv) == str(copy / "pipeline")
        assert bundle_folder("pipeline", cwd=copy / "pipeline", argv=argv) == "."
    # with that bundle_root the pipeline reads the copy's sub-bundles
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = bundle_folder("pipeline", cwd=elsewhere, argv=["run", "--config_file", str(config)])
    assert Path(parser.get_parsed_content("organ_bundle")) == copy / "organ_seg"
    # a config file outside a bundle's configs/ folder says nothing: the other rules apply
    loose = tmp_path / "mine.json"
    loose.write_text("{}")
    assert bundle_folder("organ_seg", cwd=ROOT, argv=["run", "--config_file", str(loose)]) == "bundles/organ_seg"


# --- weights trained with deep-supervision heads, loaded without them ---------------------------------------------------
def test_the_heads_are_dropped_by_name_and_every_other_key_is_strict(tmp_path):
    trained = training_network("organ_seg")
    inference = tiny_network("organ_seg", "network_def")
    assert hasattr(trained, "deep_supervision_heads") and not hasattr(inference, "deep_supervision_heads")
    state = trained.state_dict()
    heads = unused_head_keys(inference, state)
    assert heads and all("deep_supervision_heads" in k or "super_head" in k for k in heads)
    assert set(state) - set(heads) == set(inference.state_dict())
    x = torch.randn(1, 1, 64, 64, 32)

    # our loader (every inference and evaluate config, the pipeline) and torch's strict load_state_dict (MONAI's loaders)
    path = tmp_path / "model.pt"
    torch.save({"model": state, "settings": {"model": "organ"}}, path)
    with torch.no_grad():
        assert torch.equal(load_weights(inference, path)(x), trained(x))
    fresh = tiny_network("organ_seg", "network_def")
    fresh.load_state_dict(state, strict=True)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)  # a training's model.pt, whole (the Zoo's ckpt_export)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))

    # anything but the heads is still refused: an unexpected key, a missing one, heads the network has in another number
    odd = dict(state, **{"input_block.extra.weight": torch.zeros(1)})
    torch.save(odd, path)
    with pytest.raises(Flare23Error) as info:
        load_weights(tiny_network("organ_seg", "network_def"), path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "1 unexpected" in message and "input_block.extra.weight" in message
    with pytest.raises(RuntimeError, match="input_block.extra.weight"):
        tiny_network("organ_seg", "network_def").load_state_dict(odd, strict=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("bottleneck.")}, path)
    with pytest.raises(Flare23Error, match=r"missing keys e\.g\. \['bottleneck\."):
        load_weights(tiny_network("organ_seg", "network_def"), path)
    fewer = training_network("organ_seg")
    fewer_state = {k: v for k, v in state.items() if "deep_supervision_heads.2." not in k}
    torch.save(fewer_state, path)
    with pytest.raises(Flare23Error, match="missing keys e.g. \\['deep_supervision_heads.2"):
        load_weights(fewer, path)  # a training network keeps all its heads
    # heads under a module the network does not have are not heads to drop
    assert unused_head_keys(inference, {"elsewhere.deep_supervision_heads.0.conv.weight": 0}) == []

    # the pipeline: a packed checkpoint with the fine models' heads, through both loaders
    trained_cascade = trained_network("pipeline")
    packed = trained_cascade.state_dict()
    assert has_heads(packed)
    cascade = tiny_network("pipeline", "network_def")
    cascade.load_state_dict({"model": packed, "settings": {"parts": {}}}, strict=True)
    torch.save({"model": packed}, path)
    loaded = load_weights(tiny_network("pipeline", "network_def"), path)
    with torch.no_grad():
        assert torch.equal(cascade(x), trained_cascade(x)) and torch.equal(loaded(x), trained_cascade(x))
