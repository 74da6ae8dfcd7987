"""Multi-GPU mixins through ``torchrun --nproc_per_node=2`` on CPU (gloo), the command users run.

For roi_extractor, organ_seg and tumor_seg: ``train.json + multi_gpu_train.json`` (one epoch of two
iterations, tiny networks and patches) and ``train.json + evaluate.json + multi_gpu_evaluate.json``;
for the pipeline: ``inference.json + multi_gpu_inference.json``. A probe module, loaded by an extra
test-only config file in every worker, records per rank the cases that each engine's sampler
hands out and every ``torch.save`` call; from those the tests check that the data is split across
the ranks (disjoint, together all cases) and that only rank 0 writes checkpoints.

The seven launches run two at a time from one module fixture (each is a subprocess tree).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ("roi_extractor", "organ_seg", "tumor_seg")
TINY = {
    "roi_extractor": {"network_def#filters": [4, 8, 8, 8, 8], "patch_size": [32, 32, 16]},
    "organ_seg": {
        "network_def#filters": [4, 8, 8, 8, 8, 8],
        "patch_size": [64, 64, 16],
        "target_spacing": [5.0, 5.0, 8.0],
        "sw_batch_size": 1,
    },
    "tumor_seg": {
        "network_def#filters": [4, 8, 8, 8, 8, 8],
        "patch_size": [64, 64, 8],
        "target_spacing": [5.0, 5.0, 8.0],
        "sw_batch_size": 1,
    },
}
PIPELINE_TINY = {
    "roi_overrides": "{'network_def#filters': [4, 8, 8, 8, 8]}",
    "organ_overrides": "{'network_def#filters': [4, 8, 8, 8, 8, 8], 'target_spacing': [6.0, 6.0, 6.0], 'patch_size': [64, 64, 32]}",
    "tumor_overrides": "{'network_def#filters': [4, 8, 8, 8, 8, 8], 'target_spacing': [8.0, 8.0, 8.0], 'patch_size': [64, 64, 32]}",
    "load_pretrain": "false",
    "precision": "fp32",
}

PROBE = '''"""Test probe imported by the bundle config in each torchrun worker (see tests/test_multi_gpu.py)."""
import json
import os
import re
from pathlib import Path

import torch

OUT = Path(os.environ["FLARE23_PROBE_DIR"])
RANK = os.environ["RANK"]
_save = torch.save


def record(kind, value):
    with open(OUT / f"{kind}_rank{RANK}.txt", "a") as f:
        f.write(f"{value}\\n")


def _recording_save(obj, f, *args, **kwargs):
    record("saves", os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", repr(f)))
    return _save(obj, f, *args, **kwargs)


torch.save = _recording_save


class CaseRecorder:
    """At each epoch start: the case names that the engine's sampler yields on this rank."""

    def __init__(self, tag):
        self.tag = tag

    def attach(self, engine):
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: record(self.tag + "_iterations", e.state.iteration))

    def started(self, engine):
        loader = engine.data_loader
        record(self.tag + "_cases", json.dumps([Path(loader.dataset.data[i]["image"]).name for i in loader.sampler]))
'''
PROBE_CONFIG = {
    "+train#handlers": [{"_target_": "rank_probe.CaseRecorder", "tag": "train"}],
    "+validate#handlers": [{"_target_": "rank_probe.CaseRecorder", "tag": "validate"}],
}


def cli_args(overrides: dict) -> list[str]:
    return [x for k, v in overrides.items() for x in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]


def torchrun(bundle: str, files: list[str], args: list[str], work: Path, probe: Path | None) -> dict:
    configs = [str(ROOT / "bundles" / bundle / "configs" / f) for f in files] + (
        [str(probe.parent / "probe.json")] if probe else []
    )
    probe_dir = work / "probe"
    probe_dir.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", FLARE23_PROBE_DIR=str(probe_dir))
    if probe:
        env["PYTHONPATH"] = os.pathsep.join([str(probe.parent), env.get("PYTHONPATH", "")])
    # --standalone: a private rendezvous on a free port, so that parallel launches do not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "monai.bundle", "run",
           "--config_file", json.dumps(configs), "--bundle_root", str(ROOT / "bundles" / bundle), *args]  # fmt: skip
    start = time.monotonic()
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    (work / "log.txt").write_text(log)
    return {"rc": p.returncode, "log": log, "work": work, "probe": probe_dir, "seconds": time.monotonic() - start}


def read_probe(probe: Path, kind: str) -> dict[int, list[str]]:
    out = {}
    for rank in (0, 1):
        f = probe / f"{kind}_rank{rank}.txt"
        out[rank] = f.read_text().splitlines() if f.exists() else []
    return out


@pytest.fixture(scope="module")
def runs(tiny_phantoms, tmp_path_factory):
    base = tmp_path_factory.mktemp("multi_gpu")
    probe = base / "probe" / "rank_probe.py"
    probe.parent.mkdir()
    probe.write_text(PROBE)
    (probe.parent / "probe.json").write_text(json.dumps(PROBE_CONFIG))
    # 4 training and 2 validation cases: two each per rank
    items = json.loads((tiny_phantoms / "datalist.json").read_text())
    cases = items["training"] + items["validation"]
    datalist = base / "datalist.json"
    datalist.write_text(json.dumps({"training": cases[:4], "validation": cases[4:]}))
    jobs = {}
    for bundle in TRAINED:
        common = {"dataset_dir": str(tiny_phantoms), "datalist": str(datalist), "num_workers": 0, **TINY[bundle]}
        ckpt = base / bundle / "models"
        train = {**common, "ckpt_dir": str(ckpt), "output_dir": str(base / bundle / "runs"), "max_epochs": 1, "epoch_length": 2,
                 "val_interval": 1, "batch_size": 2, "cache_rate": 0.0}  # fmt: skip
        if bundle != "roi_extractor":
            train["show_progress"] = "False"
        jobs[(bundle, "train")] = (
            bundle,
            ["train.json", "multi_gpu_train.json"],
            cli_args(train),
            base / bundle / "train",
            probe,
        )
        evaluate = {**common, "ckpt_dir": str(ckpt), "output_dir": str(base / bundle / "eval")}
        jobs[(bundle, "evaluate")] = (bundle, ["train.json", "evaluate.json", "multi_gpu_evaluate.json"], cli_args(evaluate),
                                      base / bundle / "evaluate", probe)  # fmt: skip
    images = sorted((tiny_phantoms / "imagesTr").glob("*.nii.gz"))[:3]
    pipe_in = base / "pipeline_in"
    pipe_in.mkdir()
    for image in images:
        (pipe_in / image.name).symlink_to(image)
    pipe = {"dataset_dir": str(pipe_in), "output_dir": str(base / "pipeline" / "out"), **PIPELINE_TINY}
    jobs[("pipeline", "inference")] = (
        "pipeline",
        ["inference.json", "multi_gpu_inference.json"],
        cli_args(pipe),
        base / "pipeline" / "run",
        None,
    )

    results = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        # evaluation needs the trained checkpoint: each bundle's train job first, then its evaluate job
        def chain(bundle):
            results[(bundle, "train")] = torchrun(*jobs[(bundle, "train")])
            results[(bundle, "evaluate")] = torchrun(*jobs[(bundle, "evaluate")])

        futures = [pool.submit(chain, b) for b in TRAINED]
        futures.append(
            pool.submit(lambda: results.__setitem__(("pipeline", "inference"), torchrun(*jobs[("pipeline", "inference")])))
        )
        for f in futures:
            f.result()
    return {"results": results, "datalist": json.loads(datalist.read_text()), "base": base, "pipeline_images": images}


def ok(run: dict) -> dict:
    assert run["rc"] == 0, run["log"][-4000:]
    return run


def names(items: list[dict]) -> set[str]:
    return {Path(i["image"]).name for i in items}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", TRAINED)
def test_multi_gpu_train_splits_data_and_saves_on_rank_0_only(runs, bundle):
    run = ok(runs["results"][(bundle, "train")])
    # gloo on CPU, two processes
    assert (
        "backend='nccl' if torch.cuda.is_available() else 'gloo'"
        in (ROOT / "bundles" / bundle / "configs" / "multi_gpu_train.json").read_text()
    )
    cases = {r: [json.loads(line) for line in v] for r, v in read_probe(run["probe"], "train_cases").items()}
    assert len(cases[0]) == len(cases[1]) == 1  # one epoch on each rank
    rank0, rank1 = set(cases[0][0]), set(cases[1][0])
    assert len(cases[0][0]) == len(cases[1][0]) == 2 and not rank0 & rank1
    assert rank0 | rank1 == names(runs["datalist"]["training"])
    iterations = read_probe(run["probe"], "train_iterations")
    assert iterations[0] == iterations[1] == ["1", "2"]  # epoch_length 2 on both ranks
    val = {r: [json.loads(line) for line in v] for r, v in read_probe(run["probe"], "validate_cases").items()}
    assert set(val[0][0]) | set(val[1][0]) == names(runs["datalist"]["validation"]) and not set(val[0][0]) & set(val[1][0])
    # checkpoints: written by rank 0 only, each file once, and loadable without DDP's "module." prefix
    saves = read_probe(run["probe"], "saves")
    assert saves[1] == []
    ckpt_dir = runs["base"] / bundle / "models"
    # torch.save may write to a temporary ".NAME.<random>.tmp.pt" that is then renamed (atomic saving)
    written = sorted(re.sub(r"^\.(.+)\.[^.]+\.tmp\.pt$", r"\1", Path(s).name) for s in saves[0])
    assert written == sorted(["checkpoint_epoch=1.pt", "model.pt"]), written
    assert sorted(p.name for p in ckpt_dir.iterdir()) == written  # no temporary or partial files left
    state = torch.load(ckpt_dir / "model.pt", weights_only=True)
    assert state["model"] and not any(k.startswith("module.") for k in state["model"])  # DDP unwrapped
    assert state["settings"]["network"]["_target_"].endswith(("DynUNet", "LightUNet"))  # torchrun records the settings too
    full = torch.load(ckpt_dir / "checkpoint_epoch=1.pt", weights_only=True)
    assert full["trainer"]["iteration"] == 2 and full["trainer"]["epoch_length"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("bundle", TRAINED)
def test_multi_gpu_evaluate_splits_cases_and_reports_all(runs, bundle):
    run = ok(runs["results"][(bundle, "evaluate")])
    val = {r: [json.loads(line) for line in v] for r, v in read_probe(run["probe"], "validate_cases").items()}
    rank0, rank1 = set(val[0][0]), set(val[1][0])
    assert len(rank0) == len(rank1) == 1 and not rank0 & rank1
    assert rank0 | rank1 == names(runs["datalist"]["validation"])
    assert read_probe(run["probe"], "validate_iterations") == {0: ["1"], 1: ["1"]}  # one case each
    assert read_probe(run["probe"], "saves")[1] == []
    # MetricsSaver runs on every rank (it gathers the case names) and writes once, on rank 0, for all cases
    out = runs["base"] / bundle / "eval"
    metrics = dict(line.split(",")[:2] for line in (out / "metrics.csv").read_text().splitlines())
    key = {"roi_extractor": "val_roi_dice", "organ_seg": "val_mean_organ_dsc", "tumor_seg": "val_tumor_dsc"}[bundle]
    assert 0.0 <= float(metrics[key]) <= 1.0
    if bundle != "roi_extractor":
        predictions = sorted(p.name for p in (out / "predictions").glob("*.nii.gz"))
        expected = sorted(Path(i["label"]).name for i in runs["datalist"]["validation"])
        assert predictions == expected  # each validation case written once, by the rank that evaluated it
    else:
        boxes = sorted(p.name for p in (out / "boxes").glob("*_roi_box.json"))
        assert len(boxes) == 2


@pytest.mark.slow
def test_multi_gpu_pipeline_writes_each_case_once(runs):
    run = ok(runs["results"][("pipeline", "inference")])
    out = runs["base"] / "pipeline" / "out"
    per_rank = {}
    for rank in (0, 1):
        rows = (out / f"rank{rank}" / "timings.csv").read_text().splitlines()[1:]
        per_rank[rank] = [r.split(",")[0] for r in rows]
    expected = sorted(p.name.replace("_0000.nii.gz", "") for p in runs["pipeline_images"])
    assert sorted(per_rank[0] + per_rank[1]) == expected  # every case exactly once
    assert len(per_rank[0]) == 2 and len(per_rank[1]) == 1  # 3 cases: ranks 0 and 1 take every other one
    for image in runs["pipeline_images"]:
        pred = nib.load(out / image.name.replace("_0000.nii.gz", ".nii.gz"))
        ref = nib.load(image)
        assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-6)
        assert pred.get_data_dtype() == np.uint8
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in expected)
    assert not [p for p in out.rglob(".*")]  # no temporary files
    assert "2 case(s)" in run["log"] and "1 case(s)" in run["log"]
