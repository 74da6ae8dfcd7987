#!/usr/bin/env bash
# GPU check (issue 23, item 5): ours (fp16) against nnU-Net v2, as its users run it and at our settings, on
# 512 x 512 x 100 and x 300 phantoms at the paper's widths: seconds per case and peak device memory, in one
# command that never runs past its budget (default 450 s, set-up included).
#
#   bash bench/gpu_check.sh                  # on the lent GPU machine; results in $OUT (else bench/results/gpu)
#   bash bench/gpu_check.sh --dry-run        # here, on the CPU: the whole flow at tiny sizes and widths, < 2 min
#   bash bench/gpu_check.sh --fetch-wheels   # here, with network, once: the wheels the GPU image lacks,
#                                            # into $GPU_CHECK_WHEELS (default build/gpu_wheels, git-ignored)
#
# On the GPU machine nothing can be downloaded: this script uses the machine's own python3 (its CUDA torch),
# installs the carried wheels of $GPU_CHECK_WHEELS (if any) with `pip --no-index --no-deps --target`, and puts
# this checkout on PYTHONPATH (flare23 is imported from the working tree; nothing is installed into it).
# Without the nnU-Net wheels it measures ours alone and says so; without a CUDA torch it says what is missing.
#
# Environment: GPU_CHECK_BUDGET_S (whole script, default 450; dry run 115), GPU_CHECK_DRY_RUN=1 (= --dry-run),
# GPU_CHECK_PYTHON, GPU_CHECK_NNUNET_PYTHON, GPU_CHECK_WHEELS, OUT. Other arguments go to
# `python bench/gpu_check.py run` (e.g. --sizes 100 --max_runs 1).
set -uo pipefail
start=$(date +%s)
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
orig="$*"
dry="${GPU_CHECK_DRY_RUN:-0}"
fetch=0
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run | --dry_run) dry=1 ;;
    --fetch-wheels | --fetch_wheels) fetch=1 ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) pass+=("$1") ;;
  esac
  shift
done
wheels="${GPU_CHECK_WHEELS:-$root/build/gpu_wheels}"
export PYTHONUNBUFFERED=1

# a Python that imports torch (with CUDA unless a dry run); prints its path
pick_python() {
  local need_cuda=$1 c
  shift
  for c in "$@"; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 || continue
    if [ "$need_cuda" = 1 ]; then
      "$c" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1 && { command -v "$c"; return 0; }
    else
      "$c" -c 'import torch' >/dev/null 2>&1 && { command -v "$c"; return 0; }
    fi
  done
  return 1
}

if [ "$fetch" = 1 ]; then
  py=$(pick_python 0 "${GPU_CHECK_PYTHON:-}" "$root/.venv/bin/python" python3) || py=python3
  exec "$py" bench/gpu_check.py fetch --dest "$wheels"
fi

if [ "$dry" = 1 ]; then
  out="${OUT:-$root/bench/results/gpu-dry-run}"
  budget="${GPU_CHECK_BUDGET_S:-115}"
else
  out="${OUT:-$root/bench/results/gpu}"
  budget="${GPU_CHECK_BUDGET_S:-450}"
fi
mkdir -p "$out"
log="$out/gpu_check.log"
: >"$log"
exec > >(tee -a "$log") 2>&1
teepid=$!
deadline=$((start + budget))
echo "[gpu_check.sh] $(date '+%F %T') $([ "$dry" = 1 ] && echo 'DRY RUN (CPU)' || echo 'GPU run'), budget ${budget} s, out $out"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader

if [ "$dry" = 1 ]; then
  py=$(pick_python 0 "${GPU_CHECK_PYTHON:-}" "$root/.venv/bin/python" python3)
else
  py=$(pick_python 1 "${GPU_CHECK_PYTHON:-}" python3 "$root/.venv/bin/python" python) \
    || py=$(pick_python 0 "${GPU_CHECK_PYTHON:-}" python3 "$root/.venv/bin/python" python) \
    || py=$(command -v python3 || command -v python)
fi
if [ -z "${py:-}" ]; then
  echo "[gpu_check.sh] MISSING: no python3 on this machine"
  exit 2
fi
echo "[gpu_check.sh] Python: $py ($("$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, "cuda available:", torch.cuda.is_available())' 2>&1 | tail -1))"

site=""
# (a dry run uses the project's .venv and skips them: they are built for the GPU image's Python 3.12)
if { [ "$dry" != 1 ] || [ -n "${GPU_CHECK_WHEELS:-}" ]; } && { compgen -G "$wheels/*.whl" || compgen -G "$wheels/*.tar.xz"; } >/dev/null; then
  site="${TMPDIR:-/tmp}/flare23-gpu-check-site"
  echo "[gpu_check.sh] installing the carried wheels of $wheels into $site (no index, no network)"
  "$py" bench/gpu_check.py setup --wheels "$wheels" --site "$site" || echo "[gpu_check.sh] wheel set-up failed: continuing, the check says what is missing"
elif [ "$dry" != 1 ]; then
  echo "[gpu_check.sh] no carried wheels in $wheels (make them here with: bash bench/gpu_check.sh --fetch-wheels; carry build/gpu_wheels)"
fi
export PYTHONPATH="$root${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"

left=$((deadline - $(date +%s)))
if [ "$left" -lt 30 ]; then
  echo "[gpu_check.sh] only ${left} s left after the set-up: nothing measured"
  exit 3
fi
# the driver keeps its own deadline; `timeout` is the last resort should it hang
timeout -k 10 $((left + 20)) "$py" bench/gpu_check.py run --deadline "$deadline" --started "$start" --out "$out" \
  --command_text "bash bench/gpu_check.sh${orig:+ $orig}" $([ "$dry" = 1 ] && echo --dry-run) ${pass[@]+"${pass[@]}"}
rc=$?
echo "[gpu_check.sh] exit $rc after $(($(date +%s) - start)) s; results: $out/gpu_check.md, $out/gpu_check.json, log $log"
exec >&- 2>&-
wait "$teepid" 2>/dev/null
exit $rc
