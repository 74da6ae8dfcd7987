#!/usr/bin/env python3
"""Serve the four flare23 bundles with MONAI Label's ``monaibundle`` app and check one inference per bundle.

MONAI Label 0.8.5 needs numpy < 2 (through pydicom-seg), so it lives in its own virtual environment,
made from the pinned ``requirements.txt`` beside this file. The script, in order:

1. makes the environment (or reuses it when its stamp matches the pinned file), with the
   ``flare23`` package installed editable from this repository (``--no-deps``, ``editable_mode=compat``:
   a ``.pth`` file puts the repository on ``sys.path``, so the package is found as a regular package
   even where a folder named ``flare23`` comes earlier on the path, see :data:`MONAILABEL`);
2. re-runs itself with that environment's Python for the rest;
3. lays out a work folder as MONAI Label expects: ``apps/monaibundle`` (the sample app shipped in the
   monailabel wheel, copied by ``monailabel apps --download``, no network), with
   ``apps/monaibundle/model/<bundle>`` for ``roi_extractor``, ``organ_seg``, ``tumor_seg`` and
   ``pipeline`` (copies of ``bundles/``: the repository's bundles are never written to), and
   ``studies/`` with the CT (``--image``; by default the example CT of ``../shared`` beside the
   repository when it is there, else a phantom that the script generates);
4. gives every copied bundle a ``models/model.pt``. By default (``--weights tiny``) each sub-bundle
   is trained for one tiny epoch through its own ``configs/train.json`` (``python -m monai.bundle
   run training`` in this environment, ``bundle_root`` = the copy, narrow ``network_def#filters``,
   coarse spacing and small patches, on a few tiny phantoms from ``flare23.tools.phantoms``): the
   checkpoint records the settings it was trained with, and the copies' configs, byte-identical to
   the repository's, build the networks from them (CPU inference takes seconds). ``--weights repo``
   copies the repository's trained ``bundles/*/models/model.pt``; ``--weights random`` saves seeded
   random weights of the configs' own (full) widths. The pipeline's combined checkpoint is packed
   from the three with ``flare23 pack``; then each bundle's ``network_def`` is instantiated from
   its copy as MONAI Label's ``BundleInferTask`` does, ``model.pt`` is loaded into it strictly, and
   the network's widths are logged beside those the checkpoint records;
   With ``--prepare-only`` it stops here and prints the command that starts the server on this app;
5. starts the server (``python -m monailabel.main start_server``, see :data:`MONAILABEL`) on
   127.0.0.1 and a free port, waits until ``/info/`` answers, checks that the four models are listed
   with the label names of their ``metadata.json``;
6. sends a batch of requests (MONAI Label's own client): per bundle one by image id and one upload
   of the same CT, and checks each answer: a uint8 label volume of the input's shape and affine,
   labels among the bundle's ids, named labels. The app's folders, the studies, the server's
   working folder and its temporary folder are listed before and after the batch: no file may
   appear (MONAI Label writes its answer to a temporary file and removes it once sent);
7. sends, per bundle, a corrupt upload (a truncated ``.nii.gz``) and an image id that the studies
   do not hold: each must be refused (not HTTP 200), and the pipeline's answer must name the file
   and the problem in its body (HTTP 422, ``{"detail": "<file>: <problem>"}``);
8. stops the server and writes ``monailabel.log`` (human-readable) and ``summary.json``.

It exits 0 only when every check passed. Everything stays on 127.0.0.1.

Usage (from the repository root)::

    python scripts/monailabel/run_monailabel.py --work /tmp/flare23-monailabel
    # only the app folder, with tiny trained weights, and the command that serves it
    python scripts/monailabel/run_monailabel.py --work /tmp/flare23-monailabel --prepare-only

See ``docs/monailabel.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
REQUIREMENTS = HERE / "requirements.txt"
BUNDLES = ("roi_extractor", "organ_seg", "tumor_seg", "pipeline")
SUB_BUNDLES = BUNDLES[:3]
#: Outside the repository, so that a fresh clone (CI) on the same machine reuses it.
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flare23" / "monailabel-venv"
#: The default CT: the example of the ``shared`` folder beside the repository (``../shared`` from the
#: repository root), where there is one; else :func:`phantom_image` generates one in the work folder.
SHARED_IMAGE = REPO.parent / "shared" / "data" / "real_ct" / "ts_example_ct" / "ct.nii.gz"
#: The phantom served when there is no example CT (:func:`phantom_image`; not one of the tiny trainings' phantoms).
PHANTOM_IMAGE = {"cases": 1, "seed": 7, "size": "tiny"}
ENV_VAR_VENV = "FLARE23_MONAILABEL_VENV"
MARKER = ".flare23-monailabel-env"  # written first: this folder is ours and may be remade
STAMP = ".flare23-monailabel-stamp"  # written last: the environment is complete for this pin set
REPO_FILE = ".flare23-monailabel-repo"  # the repository that the editable flare23 install points at, and how
#: How flare23 is installed: ``compat`` is a ``.pth`` line with the repository's path. The default (``strict``) mode's
#: import hook comes after every ``sys.path`` entry, so a folder named ``flare23`` on PYTHONPATH or in the working
#: folder (a clone beside the environment, which ``bin/monailabel`` puts on PYTHONPATH) would be imported instead, as
#: an empty namespace package; a regular package anywhere on ``sys.path`` wins over such a folder.
EDITABLE_MODE = "compat"
INSIDE_FLAG = "--_inside-env"
#: ``--weights tiny``: each sub-bundle's train.json overrides for a one-epoch tiny training on the
#: tiny phantoms (about 5.3 x 5.3 x 8.5 mm; the organ and tumor networks' 6 stages need patches of
#: multiples of 32 x 32 x 16 / 8 at 5 x 5 x 8 mm). The checkpoint records these, and inference uses them.
TINY_TRAINING = {
    "roi_extractor": {"network_def#filters": [4, 8, 8, 8, 8], "patch_size": [32, 32, 16]},
    "organ_seg": {"network_def#filters": [4, 8, 8, 8, 8, 8], "target_spacing": [5.0, 5.0, 8.0], "patch_size": [64, 64, 16]},
    "tumor_seg": {"network_def#filters": [4, 8, 8, 8, 8, 8], "target_spacing": [5.0, 5.0, 8.0], "patch_size": [64, 64, 8]},
}
TINY_COMMON = {"max_epochs": 1, "epoch_length": 1, "val_interval": 1, "num_workers": 0, "device": "cpu"}
PHANTOMS = {"cases": 4, "seed": 0, "size": "tiny", "tumor_fraction": 0.7}
SEED = 20230
#: The ``monailabel`` command, run as ``python -m monailabel.main`` with this (the environment's) Python.
#: Not the installed ``bin/monailabel``: that bash wrapper puts the folder that holds the environment
#: on PYTHONPATH (so a folder named ``flare23`` there, such as a clone of this repository beside the
#: environment, shadowed a default editable install as an empty namespace package and the app failed
#: to load: :data:`EDITABLE_MODE`), runs whichever ``python`` is first on PATH, and passes ``$*`` unquoted.
MONAILABEL = [sys.executable, "-m", "monailabel.main"]
#: What the batch of requests must leave unchanged, relative to the work folder: every file there but
#: the script's own outputs (the server's own log files may grow; no file may appear).
OWN_OUTPUTS = ("monailabel.log", "summary.json", "env.json", "server.log", "answers", "results", "training", "phantom", "corrupt")
#: The server's temporary folder (TMPDIR), inside the work folder so that leftovers can be listed.
SERVER_TMP = "server-tmp"


class RunError(Exception):
    """A failed step: printed as one line, exit status 1."""


class Log:
    """Lines to stdout and to ``monailabel.log`` (appended, flushed at once)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


# --- 1. the environment (standard library only: runs with any Python 3.10+) -------------------
def base_python(python: str) -> str:
    """The interpreter behind ``python`` (a virtual environment's Python resolves to its base), with its version."""
    probe = "import sys; print(getattr(sys, '_base_executable', sys.executable)); print(sys.version.split()[0])"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    return f"{Path(out[0]).resolve()} {out[1]}"


def pin_digest(python: str) -> str:
    """What the environment is made from: the pins (the requirement lines, not the comments) and the base interpreter.

    Not the repository path either: a fresh clone reuses the environment.
    """
    pins = [line.strip() for line in REQUIREMENTS.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    h = hashlib.sha256("\n".join(pins).encode())
    h.update(base_python(python).encode())
    return h.hexdigest()


def ensure_env(venv: Path, log: Log, python: str) -> dict:
    """Make (or reuse) the MONAI Label environment at ``venv``; returns how long it took and whether it was reused.

    The environment is reused while its stamp matches the pins and the interpreter; only the
    editable ``flare23`` install is re-pointed when this repository lives elsewhere (a fresh clone
    in CI reuses the environment that an earlier run made).
    """
    venv = venv.expanduser().resolve()
    vpy = venv / "bin" / "python"
    digest = pin_digest(python)
    stamp = venv / STAMP
    # --no-compile: no byte-compiling of the ~8 GB install (Python compiles what it imports, once)
    pip = [str(vpy), "-m", "pip", "--disable-pip-version-check", "install", "--quiet", "--no-input", "--no-compile"]
    editable = [*pip, "--no-deps", "-e", str(REPO), "--config-settings", f"editable_mode={EDITABLE_MODE}"]
    record = f"{REPO} editable_mode={EDITABLE_MODE}"
    if vpy.exists() and stamp.is_file() and stamp.read_text().strip() == digest:
        start = time.monotonic()
        if (venv / REPO_FILE).is_file() and (venv / REPO_FILE).read_text().strip() == record:
            log(f"env: reusing {venv} (pins unchanged)")
        else:
            _run_logged(editable, log, f"pip install -e {REPO} --no-deps (re-pointing flare23, editable_mode={EDITABLE_MODE})")
            (venv / REPO_FILE).write_text(record + "\n")
        return {"venv": str(venv), "reused": True, "seconds": round(time.monotonic() - start, 1)}
    if venv.exists():
        if not (venv / MARKER).is_file():
            raise RunError(f"{venv}: exists and was not made by this script; remove it or pass another --venv")
        log(f"env: {venv} is stale or incomplete: making it again")
        shutil.rmtree(venv)
    start = time.monotonic()
    log(f"env: creating {venv} with {python} from {REQUIREMENTS.relative_to(REPO)}")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    (venv / MARKER).write_text("made by scripts/monailabel/run_monailabel.py\n")
    # Every package is pinned in requirements.txt (torch included, so that no resolver can pull
    # another torch build); --no-deps installs exactly that set.
    _run_logged([*pip, "--no-deps", "-r", str(REQUIREMENTS)], log, "pip install -r requirements.txt")
    _run_logged(editable, log, f"pip install -e {REPO} --no-deps (editable_mode={EDITABLE_MODE})")
    (venv / REPO_FILE).write_text(record + "\n")
    stamp.write_text(digest + "\n")
    seconds = time.monotonic() - start
    log(f"env: created in {seconds:.0f} s")
    return {"venv": str(venv), "reused": False, "seconds": round(seconds, 1)}


def _run_logged(cmd: list[str], log: Log, what: str) -> None:
    start = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stdout.splitlines() if "is ignored" not in line)[-3000:]
        log(f"env: {what} failed:\n{tail}")
        raise RunError(f"{what} failed (exit {proc.returncode}); see the log")
    log(f"env: {what}: {time.monotonic() - start:.0f} s")


# --- 3. the app layout (inside the environment) -----------------------------------------------
def lay_out(work: Path, image: Path, crop: list[int] | None, log: Log) -> tuple[Path, Path, str]:
    """``work/apps/monaibundle`` with ``model/<bundle>`` copies, and ``work/studies/<case>.nii.gz``."""
    apps = work / "apps"
    app = apps / "monaibundle"
    if app.exists():
        shutil.rmtree(app)
    # `monailabel apps --download --name monaibundle --output <apps>`, in this process (the command
    # would import MONAI Label once more): it copies the sample app shipped in the wheel, no network.
    from monailabel.main import Main

    try:
        Main().action_apps(argparse.Namespace(download=True, name="monaibundle", output=str(apps), prefix=None))
    except SystemExit as exc:
        raise RunError(f"monailabel apps --download --name monaibundle failed (exit {exc.code})") from None
    if not (app / "main.py").is_file():
        raise RunError(f"monailabel apps --download --name monaibundle left no {app / 'main.py'}")
    log(f"layout: sample app monaibundle copied from the monailabel package to {app}")
    model_dir = app / "model"
    for name in BUNDLES:
        src = REPO / "bundles" / name
        dst = model_dir / name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("models", "runs", "eval", "__pycache__", "*.pt"))
        (dst / "models").mkdir()
    log(f"layout: {', '.join(BUNDLES)} copied from {REPO / 'bundles'} (configs as they are) to {model_dir}")
    studies = work / "studies"
    if studies.exists():
        shutil.rmtree(studies)
    studies.mkdir(parents=True)
    image_id = "flare23_ct"
    study = studies / f"{image_id}.nii.gz"
    if crop:
        import nibabel as nib

        img = nib.load(str(image))
        box = tuple(slice(max(0, (n - c) // 2), max(0, (n - c) // 2) + min(n, c)) for n, c in zip(img.shape[:3], crop))
        sub = img.slicer[box]  # nibabel shifts the affine's origin: the crop keeps its place in space
        nib.save(sub, str(study))
        log(f"layout: study {image_id} <- central crop {tuple(sub.shape)} of {image} {tuple(img.shape)}")
    elif image.name.endswith(".nii.gz"):
        shutil.copy2(image, study)
        log(f"layout: study {image_id} <- {image}")
    else:
        import nibabel as nib

        nib.save(nib.load(str(image)), str(study))
        log(f"layout: study {image_id} <- {image} (as .nii.gz)")
    return app, studies, image_id


def phantom_image(work: Path, log: Log) -> Path:
    """A CT to serve when there is no example CT beside the repository: one tiny phantom (``flare23.tools.phantoms``)."""
    from flare23.tools.phantoms.generate import generate_phantoms

    root = work / "phantom"
    if root.exists():
        shutil.rmtree(root)
    generate_phantoms(root, **PHANTOM_IMAGE)
    image = next(iter(sorted((root / "imagesTr").glob("*.nii.gz"))), None)
    if image is None:
        raise RunError(f"flare23.tools.phantoms wrote no image into {root / 'imagesTr'}")
    log(f"layout: no --image and no example CT at {SHARED_IMAGE}: serving a generated phantom {image} ({PHANTOM_IMAGE})")
    return image


def default_image(work: Path, log: Log) -> Path:
    """``--image`` when not given: the example CT of ``../shared`` beside the repository, else a generated phantom."""
    if SHARED_IMAGE.is_file():
        log(f"layout: no --image: serving the example CT beside the repository, {SHARED_IMAGE}")
        return SHARED_IMAGE
    return phantom_image(work, log)


def cli_args(overrides: dict) -> list[str]:
    """``--key value`` pairs for ``python -m monai.bundle run`` (JSON values; strings as they are)."""
    out = []
    for key, value in overrides.items():
        out += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return out


def train_tiny(model_dir: Path, work: Path, log: Log) -> dict:
    """One tiny epoch of each sub-bundle's own ``train.json`` (``bundle_root`` = the copy); its ``model.pt`` -> the copy's ``models/``.

    The three trainings run at once, one thread each (``python -m monai.bundle run training`` with this
    environment's Python, so the checkpoints are what this environment's flare23 writes).
    """
    from flare23.tools.phantoms.generate import generate_phantoms

    root = work / "training"
    if root.exists():
        shutil.rmtree(root)
    phantoms = root / "phantoms"
    generate_phantoms(phantoms, **PHANTOMS)
    log(f"training: {PHANTOMS['cases']} tiny phantoms (flare23.tools.phantoms, seed {PHANTOMS['seed']}) -> {phantoms}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    runs = {}
    for name in SUB_BUNDLES:
        bundle = model_dir / name
        out = root / name
        out.mkdir(parents=True)
        overrides = {
            **TINY_TRAINING[name],
            **TINY_COMMON,
            "dataset_dir": str(phantoms),
            "ckpt_dir": str(out / "models"),
            "output_dir": str(out / "runs"),
            "bundle_root": str(bundle),
        }
        cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(bundle / "configs" / "train.json")]
        cmd += [
            "--meta_file",
            str(bundle / "configs" / "metadata.json"),
            "--logging_file",
            str(bundle / "configs" / "logging.conf"),
        ]
        cmd += cli_args(overrides)
        log(
            f"training: {name}: python -m monai.bundle run training --config_file model/{name}/configs/train.json "
            f"--bundle_root model/{name} {' '.join(cli_args({**TINY_TRAINING[name], **TINY_COMMON}))} (data, ckpt_dir, output_dir in {out})"
        )
        fh = open(out / "train.log", "w", encoding="utf-8")  # noqa: SIM115 - closed below
        runs[name] = (subprocess.Popen(cmd, cwd=str(out), env=env, stdout=fh, stderr=subprocess.STDOUT), fh, time.monotonic())
    result, failed = {}, []
    for name, (proc, fh, began) in runs.items():
        code = proc.wait()
        fh.close()
        seconds = time.monotonic() - began
        ckpt = root / name / "models" / "model.pt"
        if code != 0 or not ckpt.is_file():
            text = (root / name / "train.log").read_text(errors="replace")
            log(f"training: {name} failed (exit {code}); its log ends with:\n{text[-3000:]}")
            failed.append(name)
            continue
        target = model_dir / name / "models" / "model.pt"
        shutil.copy2(ckpt, target)
        settings = _settings(target, None)
        network = (settings or {}).get("network") or {}
        result[name] = {"seconds": round(seconds, 1), "log": str(root / name / "train.log"), "network": network,
                        "values": (settings or {}).get("values")}  # fmt: skip
        log(
            f"training: {name}: 1 epoch in {seconds:.0f} s; model.pt -> {target.relative_to(model_dir)}; it records "
            f"{network.get('_target_')} filters {network.get('filters')}, values {json.dumps((settings or {}).get('values'))[:200]}"
        )
    if failed:
        raise RunError(f"tiny training failed for {', '.join(failed)}; see {root}/<bundle>/train.log")
    return result


def _settings(path: Path, part: str | None) -> dict | None:
    """The settings that checkpoint ``path`` records (``part`` of a packed one), or ``None``."""
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    settings = state.get("settings") if isinstance(state, dict) else None
    if isinstance(settings, dict) and part is not None:
        settings = (settings.get("parts") or {}).get(part)
    return settings if isinstance(settings, dict) else None


def make_weights(model_dir: Path, weights: str, work: Path, log: Log) -> dict:
    """``models/model.pt`` for each sub-bundle (tiny trainings, the repository's, or random), then the pipeline's packed one."""
    import torch
    from monai.bundle import ConfigParser

    trained = {}
    if weights == "tiny":
        trained = train_tiny(model_dir, work, log)
    for i, name in enumerate(SUB_BUNDLES if weights != "tiny" else ()):
        bundle = model_dir / name
        target = bundle / "models" / "model.pt"
        if weights == "repo":
            source = REPO / "bundles" / name / "models" / "model.pt"
            if not source.is_file():
                raise RunError(f"{source}: no trained weights (train the bundle first, or use --weights tiny)")
            shutil.copy2(source, target)
            log(f"weights: {name}: copied {source}")
            continue
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser["bundle_root"] = str(bundle)  # as MONAI Label sets it
        torch.manual_seed(SEED + i)
        network = parser.get_parsed_content("network_def")
        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, str(target))
        count = sum(p.numel() for p in network.parameters())
        log(
            f"weights: {name}: RANDOM ({type(network).__name__}, {count} parameters, seed {SEED + i}) -> {target.relative_to(model_dir)}"
        )
    # `flare23 pack --bundles_dir <model_dir>`, in this process
    from flare23.inference.segment import pack_cli

    pack_cli(bundles_dir=str(model_dir))
    packed = model_dir / "pipeline" / "models" / "model.pt"
    if not packed.is_file():
        raise RunError(f"flare23 pack wrote no {packed}")
    log(f"weights: pipeline: the three sub-bundles' model.pt packed by 'flare23 pack' -> {packed.relative_to(model_dir)}")
    return trained


def configs_as_in_repo(model_dir: Path, log: Log) -> dict:
    """Each copy's ``configs/`` compared byte for byte with ``bundles/<name>/configs`` (no file added, none changed)."""
    result = {}
    for name in BUNDLES:
        ours, theirs = model_dir / name / "configs", REPO / "bundles" / name / "configs"
        files = sorted({p.name for p in ours.iterdir()} | {p.name for p in theirs.iterdir()})
        differ = [
            f
            for f in files
            if not ((ours / f).is_file() and (theirs / f).is_file() and (ours / f).read_bytes() == (theirs / f).read_bytes())
        ]
        result[name] = {"files": len(files), "differ": differ}
    bad = {k: v["differ"] for k, v in result.items() if v["differ"]}
    if bad:
        raise RunError(f"the copies' configs differ from the repository's: {bad}")
    log(f"layout: the copies' configs are byte-identical to bundles/*/configs ({sum(v['files'] for v in result.values())} files)")
    return result


def _first_conv(net) -> int | None:
    import torch

    conv = next((m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    return int(conv.out_channels) if conv is not None else None


def served_networks(model_dir: Path, log: Log) -> dict:
    """Each bundle's network as MONAI Label builds it, with ``models/model.pt`` loaded strictly; its widths against the checkpoint's.

    As ``monailabel.tasks.infer.bundle.BundleInferTask``: a ``ConfigParser`` reads ``configs/inference.json``,
    ``bundle_root`` is set to the bundle folder, ``network_def`` is instantiated; then, as
    ``BasicInferTask._get_network``, ``torch.load(model.pt)`` and ``checkpoint.get("model", checkpoint)``
    are loaded into it (here strictly, and every tensor compared).
    """
    import torch
    from monai.bundle import ConfigParser

    result = {}
    for name in BUNDLES:
        bundle = model_dir / name
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser.config.update({"bundle_root": str(bundle)})
        sys.path.insert(0, str(bundle))
        try:
            network = parser.get_parsed_content("network_def", instantiate=True)
        finally:
            sys.path.remove(str(bundle))
        checkpoint = torch.load(str(bundle / "models" / "model.pt"), map_location="cpu", weights_only=True)
        state = checkpoint.get("model", checkpoint)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RunError(
                f"{name}: models/model.pt does not load strictly into the network_def MONAI Label builds: {str(exc)[:600]}"
            ) from None
        mine = network.state_dict()
        # the fine models train with deep-supervision heads and infer without them: the network drops those keys by name
        heads = sorted(k for k in state if k not in mine)
        if any(not is_head_key(k) for k in heads) or set(mine) - set(state):
            raise RunError(f"{name}: models/model.pt and the network differ in keys other than deep-supervision heads")
        if any(not torch.equal(mine[k], state[k]) for k in mine):
            raise RunError(f"{name}: the network's weights differ from models/model.pt after loading")
        parts = {"net": network} if name != "pipeline" else {p: getattr(network, p) for p in ("roi", "organ", "tumor")}
        entry = {
            "class": type(network).__name__,
            "state_values": int(sum(v.numel() for v in mine.values())),
            "parameters": int(sum(p.numel() for p in network.parameters())),
            "strict_load": True,
            "unused_head_keys": len(heads),
            "first_conv_out": {},
            "recorded_filters": {},
        }
        for part, net in parts.items():
            settings = _settings(bundle / "models" / "model.pt", None if name != "pipeline" else part)
            entry["first_conv_out"][part] = _first_conv(net)
            entry["recorded_filters"][part] = ((settings or {}).get("network") or {}).get("filters")
            entry.setdefault("filters", {})[part] = list(getattr(net, "filters", []) or [])
        for part in parts:
            recorded = entry["recorded_filters"][part]
            if recorded is not None and (
                entry["filters"][part] != list(recorded) or entry["first_conv_out"][part] != recorded[0]
            ):
                raise RunError(
                    f"{name} ({part}): the network has filters {entry['filters'][part]}, its checkpoint records {recorded}"
                )
        result[name] = entry
        desc = "; ".join(
            f"{part}: first conv {entry['first_conv_out'][part]} channels, filters {entry['filters'][part]} (checkpoint: {entry['recorded_filters'][part]})"
            for part in parts
        )
        log(f"network {name}: {entry['class']}, {entry['parameters']} parameters, model.pt loaded strictly; {desc}")
    return result


# --- 5-6. the server and the checks ------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_labels(bundle: Path) -> dict[str, int]:
    """Label names -> ids as MONAI Label derives them: ``channel_def`` of ``pred``, lower-cased, no background."""
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    channel_def = next(iter(meta["network_data_format"]["outputs"].values()))["channel_def"]
    return {v.lower(): int(k) for k, v in channel_def.items() if v.lower() != "background"}


def server_command(app: Path, studies: Path, port: int, trainers: bool) -> list[str]:
    """``python -m monailabel.main start_server ...`` for this app (see :data:`MONAILABEL` for why not ``monailabel``)."""
    return [
        *MONAILABEL, "start_server",
        "--app", str(app),
        "--studies", str(studies),
        "--conf", "models", ",".join(BUNDLES),
        "--conf", "zoo_source", "github",  # local bundles only: no Model Zoo download
        "--conf", "sam2", "false",
        "--conf", "skip_trainers", "false" if trainers else "true",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip


def start_server(app: Path, studies: Path, work: Path, port: int, trainers: bool, log: Log) -> tuple[subprocess.Popen, Path]:
    cmd = server_command(app, studies, port, trainers)
    server_log = work / "server.log"
    log(f"server: python -m monailabel.main {' '.join(cmd[3:])}")
    # MONAI Label writes uploads and answers to temporary files: a temporary folder of its own shows what it leaves
    tmp = work / SERVER_TMP
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp))
    fh = open(server_log, "w", encoding="utf-8")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, cwd=str(work), stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc._flare23_log = fh  # type: ignore[attr-defined]
    return proc, server_log


def stop_server(proc: subprocess.Popen, log: Log) -> None:
    """SIGTERM to the server's own process group (started by us with a new session), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    proc._flare23_log.close()  # type: ignore[attr-defined]
    log(f"server: stopped (exit {proc.returncode})")


def wait_ready(client, proc: subprocess.Popen, server_log: Path, timeout: float, log: Log) -> tuple[dict, float]:
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            tail = server_log.read_text(errors="replace")[-3000:]
            log(f"server: exited with {proc.returncode} before answering; its log ends with:\n{tail}")
            raise RunError(f"monailabel start_server exited with {proc.returncode}; see {server_log}")
        try:
            return client.info(), time.monotonic() - start
        except (ConnectionError, OSError):
            pass
        except Exception as exc:  # noqa: BLE001 - the server answers but not yet with 200
            if "Status" not in str(exc):
                raise
        if time.monotonic() - start > timeout:
            raise RunError(f"the server did not answer /info/ within {timeout:.0f} s; see {server_log}")
        time.sleep(1.0)


def loaded_lines(server_log: Path) -> list[str]:
    """The server's own log lines that show each bundle's inferer being added, and its network built as its checkpoint records."""
    keep = (
        "+++ Adding Bundle from Local",
        "+++ Adding Inferer::",
        "+++ Adding Trainer::",
        "+++ Using Bundle Models",
        "network built as recorded in the checkpoint",  # flare23.models.trained, while MONAI Label instantiates network_def
        "Checkpoint keys don't match",  # MONAI Label, when it loads a model.pt that does not fit (it would go on)
    )
    return [line.strip() for line in server_log.read_text(errors="replace").splitlines() if any(k in line for k in keep)]


def last_error(server_log: Path, wait: float = 10.0) -> str:
    """The last exception line of the server's log (``SomeError: message``); the traceback may come just after the answer."""
    deadline = time.monotonic() + wait
    while True:
        lines = server_log.read_text(errors="replace").splitlines()
        errors = [line.strip() for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b.*:", line)]
        if errors:
            return errors[-1]
        if time.monotonic() > deadline:
            return "no exception in its log"
        time.sleep(0.5)


def is_head_key(key: str) -> bool:
    """A state-dict key of a DynUNet deep-supervision head (trained, not used for inference)."""
    return any(part in ("deep_supervision_heads", "super_head") for part in key.split("."))


def server_networks(server_log: Path, model_dir: Path, weights: str, log: Log) -> dict:
    """What the server's log says of the networks it served: built as each checkpoint records, loaded with no key mismatch
    but the deep-supervision heads of the trained checkpoints (which the inference networks drop by name).

    MONAI Label loads ``model.pt`` at the first request (``strict=False``, with a warning listing the keys that differ; a
    shape mismatch fails the request), so this is read after the requests.
    """
    text = server_log.read_text(errors="replace")
    mismatch = [line.strip() for line in text.splitlines() if "Checkpoint keys don't match" in line]
    for line in mismatch:
        keys = re.findall(r"'([^']+)'", line.split("other:", 1)[-1])
        if not keys or not all(is_head_key(k) for k in keys):
            raise RunError(f"MONAI Label loaded a model.pt whose keys do not match its network: {line[:400]}")
    recorded = {
        name: f"{model_dir / name / 'models' / 'model.pt'}: network built as recorded in the checkpoint" in text
        for name in SUB_BUNDLES
    }
    log(
        f"server log: 'network built as recorded in the checkpoint' for {recorded}; checkpoint keys that MONAI Label "
        f"reports as not matching: {'only deep-supervision heads' if mismatch else 'none'}"
    )
    if weights == "tiny" and not all(recorded.values()):
        missing = [k for k, v in recorded.items() if not v]
        raise RunError(f"the server log does not show {missing} built as their checkpoints record (tiny widths)")
    return recorded


def check_info(info: dict, model_dir: Path, log: Log) -> dict:
    models = info.get("models", {})
    result = {}
    for name in BUNDLES:
        if name not in models:
            raise RunError(f"/info/ does not list {name} (listed: {sorted(models)}); the server log says why")
        want = expected_labels(model_dir / name)
        got = {str(k): int(v) for k, v in models[name].get("labels", {}).items()}
        if got != want:
            raise RunError(f"/info/ {name}: labels {got} differ from its metadata.json channel_def {want}")
        result[name] = {"labels": got, "type": models[name].get("type"), "version": models[name].get("version")}
        log(
            f"loaded {name}: type {models[name].get('type')}, version {models[name].get('version')}, {len(got)} named labels: {got}"
        )
    return result


def check_answer(
    name: str, label_file: str | None, params: dict, image: Path, model_dir: Path, seconds: float, log: Log, how: str = "inference"
) -> dict:
    """One answer: a uint8 label volume of the input's shape and affine, labels among the bundle's ids, the bundle's label names."""
    import nibabel as nib
    import numpy as np

    if not label_file or not Path(label_file).is_file():
        raise RunError(f"{how} {name}: the answer has no label file (params: {params})")
    ref = nib.load(str(image))
    out = nib.load(label_file)
    data = np.asarray(out.dataobj)
    dtype = str(out.get_data_dtype())
    values = sorted(int(v) for v in np.unique(data))
    want = expected_labels(model_dir / name)
    allowed = {0, *want.values()}
    shape_ok = tuple(data.shape) == tuple(ref.shape)
    labels_ok = set(values) <= allowed and np.array_equal(data, np.round(data))
    names_ok = {str(k): int(v) for k, v in (params.get("label_names") or {}).items()} == want
    affine_ok = bool(np.allclose(out.affine, ref.affine, atol=1e-3))
    dtype_ok = dtype == "uint8"
    entry = {
        "file": label_file,
        "bytes": Path(label_file).stat().st_size,
        "dtype": dtype,
        "shape": list(data.shape),
        "input_shape": list(ref.shape),
        "labels_present": values,
        "label_names": params.get("label_names"),
        "latencies": params.get("latencies"),
        "seconds": round(seconds, 2),
        "shape_ok": shape_ok,
        "labels_ok": bool(labels_ok),
        "names_ok": names_ok,
        "affine_ok": affine_ok,
        "dtype_ok": dtype_ok,
        "affine": np.round(out.affine, 4).tolist(),
        "input_affine": np.round(ref.affine, 4).tolist(),
    }
    log(
        f"{how} answered: {name} in {seconds:.1f} s: {dtype} {tuple(data.shape)} (input {tuple(ref.shape)}), "
        f"{entry['bytes']} bytes, labels present {values} (allowed {sorted(allowed)}), {len(want)} label names in the "
        f"answer, affine {'equals' if affine_ok else 'DIFFERS FROM'} the input's"
    )
    checks = (("shape", shape_ok), ("labels", labels_ok), ("label names", names_ok), ("affine", affine_ok), ("dtype", dtype_ok))
    problems = [p for p, ok in checks if not ok]
    if problems:
        raise RunError(f"{how} {name}: wrong {', '.join(problems)}: {json.dumps(entry)[:800]}")
    return entry


def tree(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, list[int]]:
    """Every file under ``folder`` (relative path -> [size, mtime ns]), leaving out the top-level entries named in ``skip``."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts[0] in skip or not path.is_file():
            continue
        st = path.stat()
        out[str(rel)] = [st.st_size, st.st_mtime_ns]
    return out


#: The pipeline's OpenVINO conversions (its default engine on a CPU), cached beside a bundle's checkpoint by the first
#: request: ``model/<bundle>/models/.openvino/<file>`` (flare23.inference.engine.CACHE_FOLDER). A cache, not a leftover.
ENGINE_CACHE = re.compile(r"^apps/[^/]+/model/[^/]+/models/\.openvino/[^/]+$")


def tree_changes(before: dict, after: dict) -> dict:
    """Files that appeared, disappeared or changed (size or time) between two :func:`tree` listings; new files of the
    engine cache (:data:`ENGINE_CACHE`) are listed apart, as ``engine_cache``."""
    new = sorted(set(after) - set(before))
    return {
        "new": [k for k in new if not ENGINE_CACHE.match(k.replace(os.sep, "/"))],
        "engine_cache": [k for k in new if ENGINE_CACHE.match(k.replace(os.sep, "/"))],
        "removed": sorted(set(before) - set(after)),
        "changed": sorted(k for k in set(before) & set(after) if before[k] != after[k]),
    }


def send(client, name: str, image_id: str, upload: Path | None, server_log: Path, log: Log, how: str) -> tuple[str | None, dict, float]:
    """One inference request that must succeed: (the answer's file, its params, seconds)."""
    start = time.monotonic()
    try:
        label_file, params = client.infer(name, image_id, {}, file=str(upload) if upload else None)
    except Exception as exc:  # noqa: BLE001 - the server log has the traceback
        raise RunError(f"{how} {name}: {exc}; the server says: {last_error(server_log)}") from None
    return label_file, params or {}, time.monotonic() - start


def send_bad(url: str, name: str, image_id: str, upload: Path | None, server_log: Path, timeout: float) -> dict:
    """One request that must fail: its HTTP status, its body, and the server's log lines written meanwhile that name a problem."""
    import requests

    offset = server_log.stat().st_size
    files = {"file": (upload.name, upload.read_bytes(), "application/octet-stream")} if upload else None
    start = time.monotonic()
    resp = requests.post(f"{url}/infer/{name}", params={"image": image_id}, data={"params": "{}"}, files=files, timeout=timeout)
    seconds = time.monotonic() - start
    time.sleep(0.5)  # the server's last log lines of this request
    with open(server_log, encoding="utf-8", errors="replace") as fh:
        fh.seek(offset)
        lines = fh.read().splitlines()
    problems = [line.strip() for line in lines if re.search(r"Error|Exception|error:|\[ERROR\]", line)]
    body = resp.text if "json" not in resp.headers.get("content-type", "") else resp.json()
    return {"status": resp.status_code, "body": body if resp.status_code != 200 else "(a label volume)",
            "seconds": round(seconds, 2), "server_log": problems[-6:]}  # fmt: skip


def check_refusals(url: str, studies: Path, work: Path, models: list[str], server_log: Path, timeout: float, log: Log) -> dict:
    """A corrupt upload and an unknown image id, per bundle: never HTTP 200; the pipeline names the file and the problem (422)."""
    study = next(iter(sorted(studies.glob("*.nii.gz"))))
    corrupt = work / "corrupt" / "corrupt_ct.nii.gz"
    corrupt.parent.mkdir(exist_ok=True)
    corrupt.write_bytes(study.read_bytes()[:3000])  # a truncated upload: a valid gzip start and a NIfTI header, no data
    tmp = str(work / SERVER_TMP)
    result: dict = {}
    for name in models:
        for kind, image_id, upload in (("corrupt_upload", "", corrupt), ("unknown_image", "no_such_image", None)):
            answer = send_bad(url, name, image_id, upload, server_log, timeout)
            result.setdefault(name, {})[kind] = answer
            detail = answer["body"].get("detail", "") if isinstance(answer["body"], dict) else str(answer["body"])
            log(
                f"refused: {name} {kind.replace('_', ' ')}: HTTP {answer['status']} in {answer['seconds']:.1f} s, body {json.dumps(answer['body'])[:300]}; "
                f"server log: {' | '.join(answer['server_log'])[-400:] or '(no error line)'}"
            )
            if answer["status"] == 200:
                raise RunError(f"{name}: a {kind.replace('_', ' ')} was answered with HTTP 200")
            if name == "pipeline":
                want = (tmp, "truncated or corrupt") if kind == "corrupt_upload" else ("no input image", "image id")
                if answer["status"] != 422 or not all(w in detail for w in want):
                    raise RunError(f"pipeline {kind}: expected HTTP 422 naming {want} in the body, got {answer['status']} {answer['body']}")
    return result


def serve_and_check(args, log: Log, summary: dict) -> None:
    import torch
    from monailabel.client import MONAILabelClient

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    work = Path(args.work).resolve()
    versions = {}
    for mod in ("numpy", "torch", "torchvision", "monai", "monailabel", "flare23"):
        versions[mod] = getattr(__import__(mod), "__version__", "?")
    summary["versions"] = versions
    log("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    image = Path(args.image).resolve() if args.image else default_image(work, log)
    summary["image"] = str(image)
    app, studies, image_id = lay_out(work, image, args.crop, log)
    model_dir = app / "model"
    start = time.monotonic()
    summary["training"] = make_weights(model_dir, args.weights, work, log)
    summary["weights_seconds"] = round(time.monotonic() - start, 1)
    summary["configs"] = configs_as_in_repo(model_dir, log)
    summary["networks"] = served_networks(model_dir, log)
    if args.prepare_only:
        cmd = server_command(app, studies, args.port or 8000, args.trainers)
        venv_python = Path(sys.prefix) / "bin" / "python"
        command = shlex.join([str(venv_python), *cmd[1:]])
        summary["start_command"] = command
        log(f"prepared: the app {app} serves {', '.join(BUNDLES)} on the studies in {studies}; start it with")
        print(f"\n    {command}\n", flush=True)
        print(
            f"then, for example: curl -X POST \"http://127.0.0.1:{args.port or 8000}/infer/pipeline?image={image_id}&output=image\" "
            f"-F \"params={{}}\" -o {image_id}_flare23.nii.gz\n",
            flush=True,
        )
        return
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    socket.setdefaulttimeout(args.request_timeout)  # MONAI Label's client opens connections without one
    proc, server_log = start_server(app, studies, work, port, args.trainers, log)
    summary["server_log"] = str(server_log)
    try:
        client = MONAILabelClient(url, tmpdir=str(work / "answers"))
        (work / "answers").mkdir(exist_ok=True)
        info, ready = wait_ready(client, proc, server_log, args.start_timeout, log)
        log(f"server: ready on 127.0.0.1:{port} after {ready:.0f} s")
        summary["ready_seconds"] = round(ready, 1)
        for line in loaded_lines(server_log):
            log(f"server log: {line}")
        summary["models"] = check_info(info, model_dir, log)
        summary["trainers"] = sorted(info.get("trainers", {}))
        study = studies / f"{image_id}.nii.gz"
        (work / "results").mkdir(exist_ok=True)
        # the batch: per bundle, the study by its id and the same CT uploaded; nothing may stay behind in the work folder
        before = tree(work, OWN_OUTPUTS)
        summary["inference"], summary["uploads"] = {}, {}
        for name in args.models:
            for how, key, upload in (("inference", "inference", None), ("upload", "uploads", study)):
                label_file, params, seconds = send(client, name, "" if upload else image_id, upload, server_log, log, how)
                keep = work / "results" / (f"{name}.nii.gz" if not upload else f"{name}_upload.nii.gz")
                if label_file and Path(label_file).is_file():
                    shutil.move(label_file, keep)
                    label_file = str(keep)
                summary[key][name] = check_answer(name, label_file, params, study, model_dir, seconds, log, how)
        time.sleep(1.0)  # MONAI Label removes each answer's temporary file after sending it
        after = tree(work, OWN_OUTPUTS)
        changes = tree_changes(before, after)
        summary["leftovers"] = {"before": before, "after": after, **changes}
        log(
            f"leftovers: {2 * len(args.models)} requests; files under {work} (the app, the studies, the server's working and "
            f"temporary folders): {len(before)} before, {len(after)} after; new {changes['new']}, removed {changes['removed']}, "
            f"changed {changes['changed']}; OpenVINO cache written {changes['engine_cache']}"
        )
        if changes["new"] or changes["removed"]:
            raise RunError(f"the requests left files behind or removed some: new {changes['new']}, removed {changes['removed']}")
        # refusals: a corrupt upload and an unknown image id
        before = tree(work, OWN_OUTPUTS)
        summary["refusals"] = check_refusals(url, studies, work, args.models, server_log, args.request_timeout, log)
        after = tree(work, OWN_OUTPUTS)
        changes = tree_changes(before, after)
        summary["refusal_leftovers"] = changes
        log(f"refusal leftovers: new {changes['new']}, removed {changes['removed']}")
        stray = [f for f in changes["new"] if not f.startswith(SERVER_TMP + os.sep)] + changes["removed"]
        if stray:
            raise RunError(f"the refused requests left files behind in the app's folders: {stray}")
        # the server still answers after the refusals
        label_file, params, seconds = send(client, args.models[-1], image_id, None, server_log, log, "after refusals")
        keep = work / "results" / "after_refusals.nii.gz"
        shutil.move(label_file, keep)
        summary["after_refusals"] = check_answer(args.models[-1], str(keep), params, study, model_dir, seconds, log, "after refusals")
        summary["server_networks"] = server_networks(server_log, model_dir, args.weights, log)
    finally:
        stop_server(proc, log)


# --- entry point -------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="work folder: app layout, studies, server log, results, monailabel.log")
    p.add_argument(
        "--venv",
        default=os.environ.get(ENV_VAR_VENV, str(DEFAULT_VENV)),
        help=f"the MONAI Label environment (env var {ENV_VAR_VENV}; default {DEFAULT_VENV})",
    )
    p.add_argument("--python", default=sys.executable, help="the Python that makes the environment (3.10+)")
    p.add_argument(
        "--image",
        default="",
        help="a CT in NIfTI (default: ../shared/data/real_ct/ts_example_ct/ct.nii.gz beside the repository when it is there, "
        "else a phantom generated in the work folder)",
    )
    p.add_argument(
        "--crop",
        default="",
        help="X,Y,Z: serve a central crop of at most these voxel counts (a fast check); default: the whole CT",
    )
    p.add_argument(
        "--models",
        default=",".join(BUNDLES),
        help="bundles to send an inference request to (all four are always loaded and listed)",
    )
    p.add_argument(
        "--weights",
        choices=("tiny", "repo", "random"),
        default="tiny",
        help="tiny: narrow networks trained for one epoch through each bundle's train.json on tiny phantoms "
        "(fast on CPU); repo: the repository's trained bundles/*/models/model.pt; random: seeded random weights "
        "of the configs' widths",
    )
    p.add_argument(
        "--trainers", action="store_true", help="let the app also load the bundles' trainers (off: --conf skip_trainers true)"
    )
    p.add_argument("--port", type=int, default=0, help="server port on 127.0.0.1 (default: a free one)")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for the server to answer /info/")
    p.add_argument("--request-timeout", type=float, default=900.0, help="seconds one HTTP request may take")
    p.add_argument("--env-only", action="store_true", help="make the environment and stop")
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="make the environment and the app folder (with --weights), print the command that starts the server, and stop",
    )
    p.add_argument(INSIDE_FLAG, dest="inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        args.crop = [int(v) for v in args.crop.split(",")] if args.crop else None
    except ValueError:
        p.error(f"--crop {args.crop!r}: expected three integers X,Y,Z")
    if args.crop is not None and (len(args.crop) != 3 or min(args.crop) < 1):
        p.error(f"--crop {args.crop}: expected three positive integers X,Y,Z")
    unknown = sorted(set(args.models) - set(BUNDLES))
    if unknown:
        p.error(f"--models: unknown bundle(s) {unknown}; choose among {list(BUNDLES)}")
    image = Path(args.image)
    if args.image and not args.env_only and not (image.is_file() and (image.name.endswith(".nii.gz") or image.suffix == ".nii")):
        p.error(f"--image {image}: not a NIfTI file")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = Log(work / "monailabel.log")
    summary_path = work / "summary.json"
    if not args.inside:
        if (work / "monailabel.log").exists():
            (work / "monailabel.log").unlink()
        summary_path.unlink(missing_ok=True)
        try:
            env = ensure_env(Path(args.venv), log, args.python)
        except (RunError, subprocess.CalledProcessError) as exc:
            log(f"FAILED: {exc}")
            return 1
        (work / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        if args.env_only:
            return 0
        vpy = Path(env["venv"]) / "bin" / "python"
        # The rest needs torch, monai and monailabel: run it with the environment's Python.
        return subprocess.run([str(vpy), str(Path(__file__).resolve()), *argv, INSIDE_FLAG]).returncode
    summary: dict = {"ok": False, "image": str(Path(args.image).resolve()) if args.image else None, "weights": args.weights}
    env_file = work / "env.json"
    if env_file.is_file():
        summary["env"] = json.loads(env_file.read_text())
    start = time.monotonic()
    code = 1
    try:
        serve_and_check(args, log, summary)
        summary["ok"] = True
        code = 0
        if args.prepare_only:
            log(f"OK: the app is ready in {work / 'apps' / 'monaibundle'}; start the server with the command above")
        else:
            log(
                f"OK: the four bundles loaded in MONAI Label's monaibundle app; {2 * len(args.models)} inference request(s) "
                f"answered with uint8 label maps, no file left behind; {2 * len(args.models)} bad request(s) refused"
            )
    except RunError as exc:
        summary["error"] = str(exc)
        log(f"FAILED: {exc}")
    except Exception as exc:  # noqa: BLE001 - anything else is a failure of the run, reported in one line
        summary["error"] = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {type(exc).__name__}: {exc}")
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
