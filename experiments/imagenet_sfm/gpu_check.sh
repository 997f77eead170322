#!/usr/bin/env bash
# One-GPU throughput check of the ImageNet-256 SFM recipe: no downloads, randomly initialised FLUX.2-sized VAE and
# SiT-B/2 on synthetic 256x256 images. Prints one JSON object (also written to $OUT_JSON). Sized for a budget of
# 8 minutes on one H200 (a goal: it has not run on a GPU yet). Extra arguments go to gpu_check.py (e.g. --cpu-smoke
# for the tiny CPU path, --peak-tflops 756, --compile, --sit SiT-XL/2).
#
#   bash experiments/imagenet_sfm/gpu_check.sh                 # on the GPU machine, from anywhere
#   OUT_JSON=gpu_check.json bash experiments/imagenet_sfm/gpu_check.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# Import the checkout itself, installed or not (the device machine gets a bare copy of the tree).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1  # nothing may be fetched
export TOKENIZERS_PARALLELISM=false
OUT_JSON="${OUT_JSON:-${OUT:-$REPO/runs}/gpu_check.json}"
LIMIT_S="${LIMIT_S:-470}"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
# The hard limit keeps the whole check inside its 8-minute budget even if something hangs.
exec timeout --signal=TERM --kill-after=10 "$LIMIT_S" python "$HERE/gpu_check.py" --out "$OUT_JSON" "$@"
