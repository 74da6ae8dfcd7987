"""Shared fixtures: the ../shared folder (real CT) and tiny synthetic phantom data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLARE23_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session", autouse=True)
def _user_cache(tmp_path_factory):
    """The user's cache folder (OpenVINO conversions of checkpoints in unwritable or missing folders) in a temporary
    folder: the suite never writes under the home directory; subprocesses inherit it."""
    saved = os.environ.get("XDG_CACHE_HOME")
    # MONAI Label's environment (minutes to make) stays where scripts/monailabel/run_monailabel.py keeps it between runs
    os.environ.setdefault("FLARE23_MONAILABEL_VENV", str(Path(saved or Path.home() / ".cache") / "flare23" / "monailabel-venv"))
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user_cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED} (set FLARE23_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def real_ct_dir(shared_dir) -> Path:
    d = shared_dir / "data" / "real_ct" / "ts_example_ct"
    if not (d / "ct.nii.gz").exists():
        pytest.skip(f"real CT example missing at {d}")
    return d


@pytest.fixture(scope="session")
def real_dicom_dir(shared_dir) -> Path:
    d = shared_dir / "data" / "real_ct" / "ts_example_dicom"
    if not (d / "dicom").is_dir():
        pytest.skip(f"real DICOM example missing at {d}")
    return d


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory) -> Path:
    """Six tiny phantom cases (about 64 x 64 x 32) with datalist.json, generated once per session."""
    from flare23.tools.phantoms.generate import generate_phantoms

    out = tmp_path_factory.mktemp("phantoms_tiny")
    generate_phantoms(out, cases=6, seed=0, size="tiny")
    return out


@pytest.fixture()
def dist_env(monkeypatch):
    """A one-process torch.distributed world (gloo) on a free port, for the multi-GPU mixins' initialize."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
