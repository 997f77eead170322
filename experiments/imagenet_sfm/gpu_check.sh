#!/usr/bin/env bash
# The GPU check of the ImageNet-256 recipe on a bare GPU machine, in one command: installs the carried wheels
# offline (experiments/imagenet_sfm/wheels/, built where PyPI is reachable by scripts/gpu_wheels.py), then runs every
# stage of the recipe at small size (gpu_check.py's docstring lists them) and prints one JSON report, also written to
# $OUT/gpu_check.json with the stages' logs in $OUT/gpu_check.log (without $OUT: <checkout>/runs/). Budget: under 8
# minutes of wall clock (a goal; not yet run on a GPU), held by a hard limit (LIMIT_S, default 470 s) on top of the
# per-stage time slices. Nothing is downloaded. Extra arguments go to gpu_check.py (--cpu: the tiny CPU mode;
# --peak-tflops 756 for an H100 PCIe; --budget SECONDS).
#
#   bash experiments/imagenet_sfm/gpu_check.sh              # on the GPU machine, from anywhere in the checkout
#   PYTHON=/path/to/python3 bash experiments/imagenet_sfm/gpu_check.sh --cpu
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"  # the GPU image has python3 (the one with torch), not python
# Import the checkout itself, installed or not (the device machine gets a bare copy of the tree).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1  # nothing may be fetched
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
OUT_DIR="${OUT:-$REPO/runs}"
LIMIT_S="${LIMIT_S:-470}"
mkdir -p "$OUT_DIR"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
# The hard limit keeps the whole check inside its budget even if something hangs; gpu_check.py stops each stage at
# its own slice well before (and writes the report with whatever each stage measured).
exec timeout --signal=TERM --kill-after=10 "$LIMIT_S" "$PYTHON" "$HERE/gpu_check.py" \
  --out "$OUT_DIR/gpu_check.json" --wheels "$HERE/wheels" "$@"
