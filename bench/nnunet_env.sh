#!/usr/bin/env bash
# Build bench/.venv-nnunet: nnU-Net v2 2.8.1 beside the CPU torch 2.13.0 (pinned first, see
# bench/requirements-nnunet.txt). Usage, from the repository root:  bash bench/nnunet_env.sh [PYTHON]
# On a GPU machine pass TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index) to keep a CUDA torch.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${1:-python3.11}"
venv="$here/.venv-nnunet"
"$py" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "${TORCH_SPEC:-torch==2.13.0}"
"$venv/bin/pip" install --quiet -r "$here/requirements-nnunet.txt"
"$venv/bin/python" -c "import torch, nnunetv2, importlib.metadata as m; print('nnunetv2', m.version('nnunetv2'), 'torch', torch.__version__)"
