"""MONAI Label (issues 8 and 26): the four bundles load in MONAI Label's ``monaibundle`` app and answer cleanly.

Runs ``scripts/monailabel/run_monailabel.py`` once per session (one server). The script makes (or reuses) its own
environment (MONAI Label 0.8.5 pins numpy < 2; default ``~/.cache/flare23/monailabel-venv``, or
``$FLARE23_MONAILABEL_VENV``), lays the bundles out in an app (configs copied as they are), trains
each sub-bundle for one tiny epoch through its own ``train.json`` at narrow widths (the checkpoint
records them; no override reaches MONAI Label), starts the server on 127.0.0.1 and sends a batch of
requests on a central crop of the real CT: per bundle one by image id and one upload, then a corrupt
upload and an unknown image id. Here the script's log, its summary, the server's log, the checkpoints
and the result files are checked against values computed independently: label names from the
bundles' ``metadata.json`` and :mod:`flare23.constants`, the expected crop shape and affine from the
CT's header, the widths from the training overrides, the work folder's files listed here.

Slow: making the environment takes several minutes the first time on a machine; later runs (and
fresh clones, as in CI) reuse it.
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

from flare23.constants import FILTERS, LABELS, NUM_CLASSES
from flare23.models.networks import ROI_FILTERS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "monailabel" / "run_monailabel.py"
BUNDLES = ("roi_extractor", "organ_seg", "tumor_seg", "pipeline")
SUB_BUNDLES = BUNDLES[:3]
PARTS = {"roi_extractor": "roi", "organ_seg": "organ", "tumor_seg": "tumor"}
CROP = (48, 40, 40)
#: the widths of the script's tiny trainings (its TINY_TRAINING overrides), and what else they record
TINY_FILTERS = {"roi_extractor": [4, 8, 8, 8, 8], "organ_seg": [4, 8, 8, 8, 8, 8], "tumor_seg": [4, 8, 8, 8, 8, 8]}
TINY_VALUES = {
    "organ_seg": {"target_spacing": [5.0, 5.0, 8.0], "patch_size": [64, 64, 16]},
    "tumor_seg": {"target_spacing": [5.0, 5.0, 8.0], "patch_size": [64, 64, 8]},
}
#: Environment creation (first run: about 5-10 min on 2 cores) plus the server run (2-5 min).
TIMEOUT_S = 2700

pytestmark = pytest.mark.slow


def metadata_labels(bundle: str) -> dict[str, int]:
    """Named labels as MONAI Label should list them: the bundle's channel_def, lower-cased, without background."""
    meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {name.lower(): int(i) for i, name in channel_def.items() if name.lower() != "background"}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (ns)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def served(real_ct_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("monailabel")
    image = real_ct_dir / "ct.nii.gz"
    before = {"bundles": snapshot(REPO / "bundles"), "image": image.stat().st_mtime_ns}
    cmd = [sys.executable, str(SCRIPT), "--work", str(work), "--image", str(image), "--crop", ",".join(map(str, CROP))]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S, cwd=str(REPO))
    after = {"bundles": snapshot(REPO / "bundles"), "image": image.stat().st_mtime_ns}
    log = (work / "monailabel.log").read_text() if (work / "monailabel.log").is_file() else ""
    summary = json.loads((work / "summary.json").read_text()) if (work / "summary.json").is_file() else {}
    return {"proc": proc, "work": work, "image": image, "log": log, "summary": summary, "before": before, "after": after}


def test_script_succeeds_and_its_log_shows_four_loaded_bundles_and_answers(served):
    proc, log = served["proc"], served["log"]
    assert proc.returncode == 0, f"run_monailabel.py failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}"
    assert served["summary"]["ok"] is True
    for bundle in BUNDLES:
        assert f"loaded {bundle}: " in log
        assert f"inference answered: {bundle} in " in log and f"upload answered: {bundle} in " in log
        assert f"refused: {bundle} corrupt upload: HTTP " in log and f"refused: {bundle} unknown image: HTTP " in log
        # MONAI Label's own words, copied from the server log
        assert f"+++ Adding Inferer:: {bundle} => " in log
        assert f"+++ Adding Bundle from Local: {bundle} => " in log
        assert f"network {bundle}: " in log and "model.pt loaded strictly" in log
    for bundle in SUB_BUNDLES:
        assert f"training: {bundle}: 1 epoch in " in log
        assert f"training: {bundle}: python -m monai.bundle run training --config_file model/{bundle}/configs/train.json" in log
    assert "layout: the copies' configs are byte-identical to bundles/*/configs" in log
    assert "OK: the four bundles loaded" in log
    server_log = Path(served["summary"]["server_log"]).read_text(errors="replace")
    assert "Uvicorn running on http://127.0.0.1:" in server_log
    # started as `python -m monailabel.main` (not the bin/monailabel wrapper, which puts the folder holding the
    # environment on PYTHONPATH)
    assert "server: python -m monailabel.main start_server --app " in log
    assert "Using PYTHONPATH=" not in server_log
    env = served["summary"]["versions"]
    assert env["monailabel"] == "0.8.5" and env["numpy"].startswith("1.")


def test_info_lists_the_four_bundles_with_their_label_names(served):
    models = served["summary"].get("models", {})
    assert set(BUNDLES) <= set(models), f"models listed by /info/: {sorted(models)}"
    flare = {LABELS[i]: i for i in range(1, NUM_CLASSES)}  # the 13 organs and tumor, from the constants
    for bundle in BUNDLES:
        assert models[bundle]["labels"] == metadata_labels(bundle), bundle
    for bundle in ("organ_seg", "tumor_seg", "pipeline"):
        assert models[bundle]["labels"] == flare, bundle
    assert models["roi_extractor"]["labels"] == {"abdomen": 1}


def test_answers_are_label_volumes_on_the_input_grid(served):
    answers = served["summary"].get("inference", {})
    assert set(answers) == set(BUNDLES)
    ct = nib.load(str(served["image"]))
    start = [max(0, (n - c) // 2) for n, c in zip(ct.shape, CROP)]
    shape = tuple(min(n, c) for n, c in zip(ct.shape, CROP))
    affine = ct.affine.copy()
    affine[:3, 3] = ct.affine[:3, :3] @ np.asarray(start, dtype=float) + ct.affine[:3, 3]  # the crop's origin
    for bundle in BUNDLES:
        path = served["work"] / "results" / f"{bundle}.nii.gz"
        assert path.is_file(), bundle
        result = nib.load(str(path))
        data = np.asarray(result.dataobj)
        assert data.shape == shape, bundle
        np.testing.assert_allclose(result.affine, affine, atol=1e-3, err_msg=bundle)
        assert np.array_equal(data, np.round(data)), bundle
        allowed = {0, *metadata_labels(bundle).values()}
        present = set(np.unique(data).astype(int).tolist())
        assert present <= allowed, (bundle, sorted(present - allowed))
        assert present != {0} or bundle == "pipeline", (bundle, "the tiny trained networks give some foreground")
        assert answers[bundle]["label_names"] == metadata_labels(bundle), bundle
        assert answers[bundle]["labels_present"] == sorted(present), bundle


def test_every_answer_is_a_uint8_label_map(served):
    """Issue 26: uint8 label maps from all four bundles, by image id and by upload, without the client asking for a dtype."""
    summary = served["summary"]
    ct = nib.load(str(served["image"]))
    voxels = int(np.prod([min(n, c) for n, c in zip(ct.shape, CROP)]))
    for bundle in BUNDLES:
        for how, key, name in (("by id", "inference", f"{bundle}.nii.gz"), ("upload", "uploads", f"{bundle}_upload.nii.gz")):
            path = served["work"] / "results" / name
            result = nib.load(str(path))
            assert result.get_data_dtype() == np.uint8, (bundle, how, result.get_data_dtype())
            assert summary[key][bundle]["dtype"] == "uint8", (bundle, how)
            # one byte per voxel before compression: a float32 map would be four
            assert result.dataobj.dtype.itemsize == 1 and result.header.get_data_shape() == tuple(summary[key][bundle]["shape"])
            assert int(np.prod(result.shape)) == voxels, (bundle, how)
        # the upload is the same CT: the same answer
        by_id = np.asarray(nib.load(str(served["work"] / "results" / f"{bundle}.nii.gz")).dataobj)
        upload = np.asarray(nib.load(str(served["work"] / "results" / f"{bundle}_upload.nii.gz")).dataobj)
        assert np.array_equal(by_id, upload), bundle


def _listing(work: Path) -> dict[str, list[int]]:
    """The work folder's files as the script lists them for the leftover check (its own outputs left out)."""
    own = {"monailabel.log", "summary.json", "env.json", "server.log", "answers", "results", "training", "phantom", "corrupt"}
    return {
        str(p.relative_to(work)): [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(work.rglob("*"))
        if p.is_file() and p.relative_to(work).parts[0] not in own
    }


def test_the_requests_leave_no_file_behind(served):
    """Issue 26: after the batch of good requests (4 by id, 4 uploads) the app's folders, the studies, the server's
    working folder and its temporary folder hold exactly the files they held before; the answers came back."""
    work, summary = served["work"], served["summary"]
    left = summary["leftovers"]
    before, after = left["before"], left["after"]
    # the listing covered the app (its bundles and their weights), the studies and the server's temporary folder
    app = "apps/monaibundle/"
    assert f"{app}main.py" in before and all(f"{app}model/{b}/models/model.pt" in before for b in BUNDLES)
    assert all(f"{app}model/{b}/configs/inference.json" in before for b in BUNDLES)
    assert "studies/flare23_ct.nii.gz" in before
    # the one thing a first request may add: the pipeline's OpenVINO conversions (its default engine on a CPU), organ and
    # tumor networks, each an .xml, a .bin and the .json record, cached beside the organ checkpoint and kept for later requests
    cache = f"{app}model/organ_seg/models/.openvino/"
    converted = [] if torch.cuda.is_available() else ["bin", "bin", "json", "json", "xml", "xml"]  # engine auto: PyTorch on CUDA
    assert sorted(k.rsplit(".", 1)[-1] for k in left["engine_cache"]) == converted, left
    assert all(k.startswith(cache) and k.split("/")[-1].startswith(("organ-", "tumor-")) for k in left["engine_cache"])
    assert sorted(set(after) - set(left["engine_cache"])) == sorted(before), {
        "new": sorted(set(after) - set(before)), "gone": sorted(set(before) - set(after))}  # fmt: skip
    assert left["new"] == [] and left["removed"] == []
    # what only the server's own logs and datastore may change (sizes and times, never new files)
    assert all(k.startswith((f"{app}logs/", "studies/")) for k in left["changed"]), left["changed"]
    # the leftovers that issue 26 found are gone for good: the pipeline's SaveLabeld (output/<name>.nii.gz.nii.gz in the
    # server's working folder), the ROI bundle's mask and box JSON (model/roi_extractor/eval/), upload temporaries
    now = _listing(work)
    assert not [k for k in now if k.endswith(".nii.gz.nii.gz") or k.startswith("output/") or "/eval/" in k], sorted(now)
    assert not (work / "output").exists()
    assert not (work / "apps" / "monaibundle" / "model" / "roi_extractor" / "eval").exists()
    for bundle in BUNDLES:
        assert not (work / "apps" / "monaibundle" / "model" / bundle / "eval").exists(), bundle
    # the server's temporary folder was listed: before the batch it held only MONAI Label's logging configuration (a
    # .json written at start), and no upload or answer is left in it after the batch
    assert [k for k in before if k.startswith("server-tmp/")] and all(k.endswith(".json") for k in after if k.startswith("server-tmp/"))


def test_corrupt_uploads_and_unknown_images_are_refused_naming_the_problem(served):
    """Issue 26: a corrupt upload and an unknown image id are never answered 200; every bundle answers 422 with the file
    and the problem in the body, and nothing else goes wrong after it (no empty result written, no follow-on error)."""
    refusals, work = served["summary"]["refusals"], served["work"]
    tmp = str(work / "server-tmp")
    for bundle in BUNDLES:
        for kind in ("corrupt_upload", "unknown_image"):
            assert refusals[bundle][kind]["status"] != 200, (bundle, kind)
        # the sub-bundles' loader (flare23.data.loading.LoadCaseImaged): 422, the file and the problem in the body
        if bundle != "pipeline":
            bad = refusals[bundle]["corrupt_upload"]
            assert bad["status"] == 422, (bundle, bad)
            assert bad["body"]["detail"].startswith(tmp + os.sep) and "cannot be read as an image" in bad["body"]["detail"], bad
            missing = refusals[bundle]["unknown_image"]
            assert missing["status"] == 422 and "\n" not in missing["body"]["detail"], (bundle, missing)
            assert not [line for line in missing["server_log"] if "Boolean value" in line], missing["server_log"]
    corrupt = refusals["pipeline"]["corrupt_upload"]
    assert corrupt["status"] == 422, corrupt
    detail = corrupt["body"]["detail"]
    # the file (MONAI Label's temporary copy of the upload) and the problem, in one line
    assert detail.startswith(tmp + os.sep) and ".nii.gz: truncated or corrupt image data" in detail, detail
    assert "\n" not in detail
    # logged once by flare23, with no follow-on error (the ITK writer's, 'Boolean value of Tensor ...')
    assert any(detail in line for line in corrupt["server_log"]), corrupt["server_log"]
    assert not [line for line in corrupt["server_log"] if "itk" in line.lower() or "Boolean value" in line], corrupt["server_log"]
    unknown = refusals["pipeline"]["unknown_image"]
    assert unknown["status"] == 422 and "no input image" in unknown["body"]["detail"], unknown
    assert any(unknown["body"]["detail"] in line for line in unknown["server_log"]), unknown["server_log"]
    assert not [line for line in unknown["server_log"] if "DICOM" in line or "Boolean value" in line], unknown["server_log"]
    # the refusals left nothing in the app's folders; MONAI Label keeps a failed request's upload in its temporary folder
    # (it removes uploads in a background task that FastAPI runs only after a successful answer)
    new = served["summary"]["refusal_leftovers"]["new"]
    assert all(k.startswith("server-tmp" + os.sep) and k.endswith(".nii.gz") for k in new), new
    assert len(new) == len(BUNDLES), new  # one per corrupt upload, none for the unknown ids
    # and the server still answers afterwards
    assert served["summary"]["after_refusals"]["dtype"] == "uint8"


def test_pipeline_answer_equals_the_bundle_run_outside_monai_label(served, tmp_path):
    """The same laid-out pipeline bundle (same configs, same tiny trained weights), run by ``monai.bundle`` in the project's environment."""
    bundle = served["work"] / "apps" / "monaibundle" / "model" / "pipeline"
    study = served["work"] / "studies" / "flare23_ct.nii.gz"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--dataset_dir", str(study), "--output_dir", str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    written = nib.load(str(out / "flare23_ct.nii.gz"))
    assert written.get_data_dtype() == np.uint8
    ours = np.asarray(written.dataobj)
    answer = np.asarray(nib.load(str(served["work"] / "results" / "pipeline.nii.gz")).dataobj)
    assert ours.shape == answer.shape
    # other torch / MONAI builds in the two environments: a few voxels may flip between near-equal classes
    assert np.mean(ours == answer) > 0.99


def checkpoint(path: Path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=True)


def is_head_key(key: str) -> bool:
    """A tensor of DynUNet's deep-supervision heads (trained, not part of the inference network)."""
    return any(part in ("deep_supervision_heads", "super_head") for part in key.split("."))


def test_checkpoints_come_from_the_bundles_training_at_tiny_widths(served):
    """Each sub-bundle's model.pt: written by its own train.json (one epoch), recording the tiny widths, not the configs' defaults."""
    copies = served["work"] / "apps" / "monaibundle" / "model"
    defaults = {"roi_extractor": list(ROI_FILTERS), "organ_seg": list(FILTERS), "tumor_seg": list(FILTERS)}
    for bundle in SUB_BUNDLES:
        trained = served["work"] / "training" / bundle / "models"
        assert sorted(p.name for p in trained.iterdir()) == ["checkpoint_epoch=1.pt", "model.pt"], bundle
        assert (copies / bundle / "models" / "model.pt").read_bytes() == (trained / "model.pt").read_bytes(), bundle
        state = checkpoint(copies / bundle / "models" / "model.pt")
        assert set(state) == {"model", "settings"}, bundle
        settings = state["settings"]
        meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
        assert settings["model"] == PARTS[bundle] and settings["bundle"] == meta["name"], bundle
        assert settings["network"]["filters"] == TINY_FILTERS[bundle] != defaults[bundle], bundle
        for key, value in TINY_VALUES.get(bundle, {}).items():
            assert settings["values"][key] == value, (bundle, key)
        first = next(v for k, v in state["model"].items() if v.ndim == 5)  # the first convolution's weight
        assert first.shape[0] == TINY_FILTERS[bundle][0], bundle
    packed = checkpoint(copies / "pipeline" / "models" / "model.pt")
    assert set(packed["settings"]["parts"]) == set(PARTS.values())
    for bundle, part in PARTS.items():
        assert packed["settings"]["parts"][part]["network"]["filters"] == TINY_FILTERS[bundle], bundle
        sub = checkpoint(copies / bundle / "models" / "model.pt")["model"]
        mine = {k[len(part) + 1 :]: v for k, v in packed["model"].items() if k.startswith(part + ".")}
        # every tensor of the sub-bundle's checkpoint, but perhaps the deep-supervision heads (not used for inference)
        assert {k for k in sub if not is_head_key(k)} <= mine.keys() <= sub.keys(), bundle
        assert all(torch.equal(mine[k], sub[k]) for k in mine), bundle


def test_the_served_networks_have_the_trained_tiny_widths(served):
    """The networks built from the copies as MONAI Label builds them, and the server's own log, agree with the checkpoints."""
    copies = served["work"] / "apps" / "monaibundle" / "model"
    networks = served["summary"]["networks"]
    assert set(networks) == set(BUNDLES)
    for bundle in BUNDLES:
        entry = networks[bundle]
        state = checkpoint(copies / bundle / "models" / "model.pt")["model"]
        assert entry["strict_load"] is True, bundle
        # the inference networks have no deep-supervision heads: they drop the trained heads' tensors by name
        heads = [k for k in state if is_head_key(k)]
        assert entry["unused_head_keys"] == len(heads), bundle
        assert entry["state_values"] == sum(v.numel() for k, v in state.items() if not is_head_key(k)), bundle
        parts = {"net": bundle} if bundle != "pipeline" else {p: b for b, p in PARTS.items()}
        for part, sub in parts.items():
            assert entry["filters"][part] == entry["recorded_filters"][part] == TINY_FILTERS[sub], (bundle, part)
            assert entry["first_conv_out"][part] == TINY_FILTERS[sub][0], (bundle, part)
    assert networks["pipeline"]["state_values"] == sum(networks[b]["state_values"] for b in SUB_BUNDLES)
    # the server itself: each network_def built as its checkpoint records (flare23.models.trained logs it only when that
    # differs from the config's default network), and every model.pt loaded with matching keys (MONAI Label loads
    # with strict=False and warns on a key mismatch; a shape mismatch would have failed the request)
    server_log = Path(served["summary"]["server_log"]).read_text(errors="replace")
    for bundle in SUB_BUNDLES:
        assert f"{copies / bundle / 'models' / 'model.pt'}: network built as recorded in the checkpoint" in server_log, bundle
    for line in server_log.splitlines():
        if "Checkpoint keys don't match" in line:  # MONAI Label's warning: only the heads may differ
            keys = re.findall(r"'([^']+)'", line.split("other:", 1)[1])
            assert keys and all(is_head_key(k) for k in keys), line[:500]
    assert served["summary"]["server_networks"] == dict.fromkeys(SUB_BUNDLES, True)


def test_the_copies_configs_are_the_repositorys_byte_for_byte(served):
    copies = served["work"] / "apps" / "monaibundle" / "model"
    for bundle in BUNDLES:
        ours, theirs = copies / bundle / "configs", REPO / "bundles" / bundle / "configs"
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir()), bundle
        for path in theirs.iterdir():
            assert (ours / path.name).read_bytes() == path.read_bytes(), (bundle, path.name)
    assert all(not v["differ"] for v in served["summary"]["configs"].values())


def test_the_repository_bundles_and_the_input_are_left_untouched(served):
    assert served["after"] == served["before"]
    copies = served["work"] / "apps" / "monaibundle" / "model"
    assert sorted(p.name for p in copies.iterdir() if p.is_dir()) == sorted(BUNDLES)
    for bundle in BUNDLES:
        assert (copies / bundle / "models" / "model.pt").is_file(), bundle


def test_a_folder_named_flare23_beside_the_environment_does_not_shadow_the_package(served, tmp_path):
    """``bin/monailabel`` puts the folder holding the environment on PYTHONPATH, and ``python -m`` the working folder:
    a folder named ``flare23`` there (a clone beside the environment) must not replace the installed package."""
    venv = Path(json.loads((served["work"] / "env.json").read_text())["venv"])
    (tmp_path / "flare23" / "bundles").mkdir(parents=True)  # a clone's root: no __init__.py
    probe = "import flare23, flare23.models.trained; print(flare23.__file__)"
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PYTHONWARNINGS="ignore")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == str(REPO / "flare23" / "__init__.py"), r.stdout


def test_prepare_only_makes_an_app_to_try_by_hand_and_prints_its_start_command(served, tmp_path):
    """``--prepare-only --weights random``: the app folder with random weights (no training, no server) and the command
    that serves it, ``python -m monailabel.main start_server`` with the environment's Python."""
    work = tmp_path / "prepared"
    cmd = [sys.executable, str(SCRIPT), "--work", str(work), "--prepare-only", "--weights", "random", "--port", "8123",
           "--image", str(served["image"]), "--crop", ",".join(map(str, CROP))]  # fmt: skip
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = json.loads((work / "summary.json").read_text())
    venv = Path(json.loads((work / "env.json").read_text())["venv"])
    app = work / "apps" / "monaibundle"
    command = summary["start_command"]
    assert command.startswith(f"{venv / 'bin' / 'python'} -m monailabel.main start_server --app {app} --studies {work / 'studies'} ")
    assert "--conf models roi_extractor,organ_seg,tumor_seg,pipeline" in command and command.endswith("--port 8123")
    assert command in proc.stdout
    for bundle in BUNDLES:
        assert (app / "model" / bundle / "models" / "model.pt").is_file(), bundle
    assert "weights: organ_seg: RANDOM" in proc.stdout
    assert not (work / "server.log").exists() and "server: " not in (work / "monailabel.log").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "no/such/ct.nii.gz"], "not a NIfTI file"),
        (["--crop", "48,40"], "expected three positive integers"),
        (["--models", "pipeline,spleen"], "unknown bundle"),
        (["--weights", "full"], "argument --weights: invalid choice"),
        (["--widths", "tiny"], "unrecognized arguments: --widths tiny"),  # gone: the checkpoints carry their widths
    ],
)
def test_bad_arguments_are_refused_in_one_line_before_any_work(tmp_path, args, message):
    env = dict(os.environ, FLARE23_MONAILABEL_VENV=str(tmp_path / "venv"))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(tmp_path / "work"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "venv").exists()
