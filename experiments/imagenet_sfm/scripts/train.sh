#!/usr/bin/env bash
# Train one config of the grid with `accelerate launch`, on one node or many; resumes when the run has a checkpoint.
#
#   bash experiments/imagenet_sfm/scripts/train.sh flux2-B2-spherical-80ep [--set key=value ...]
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 bash experiments/imagenet_sfm/scripts/train.sh flux2-XL2-linear-80ep
#
# The config is a file path or a name from experiments/imagenet_sfm/configs/. Paths inside it are relative to the
# directory you launch from (see the README's layout). Environment:
#   GPUS_PER_NODE (default: all visible GPUs), NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost),
#   MASTER_PORT (29500), RUNS (runs), ACCELERATE_EXTRA (extra `accelerate launch` flags, e.g. "--dynamo_backend no"),
#   ACCELERATE (the launcher executable, default: accelerate), PYTHON (the interpreter that counts the GPUs,
#   default: python3).
# Extra arguments go to `manifold-fm train` (e.g. --set train.compile=true).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG_NAME_OR_PATH [manifold-fm train options...]" >&2
  exit 2
fi
GIVEN="$1"; shift
CONFIG="$GIVEN"
if [[ ! -f "$CONFIG" ]]; then
  CONFIG="$(cd "$HERE/../configs" && pwd)/${CONFIG%.yaml}.yaml"
fi
if [[ ! -f "$CONFIG" ]]; then
  echo "error: config '$GIVEN' is neither a file nor one of: $(ls "$HERE/../configs" | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
  exit 2
fi
NAME="$(basename "${CONFIG%.yaml}")"
RUNS="${RUNS:-runs}"
OUT="$RUNS/$NAME"
PYTHON="${PYTHON:-python3}"  # every Python 3 install has python3 (the GPU image has no python)
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))

LAUNCH=("${ACCELERATE:-accelerate}" launch --num_processes "$NUM_PROCESSES" --num_machines "$NNODES" --machine_rank "$NODE_RANK")
if [[ "$NUM_PROCESSES" -gt 1 ]]; then
  LAUNCH+=(--multi_gpu --main_process_ip "${MASTER_ADDR:-localhost}" --main_process_port "${MASTER_PORT:-29500}")
fi
# shellcheck disable=SC2206  # ACCELERATE_EXTRA is meant to split into flags
LAUNCH+=(${ACCELERATE_EXTRA:-})

ARGS=(train --config "$CONFIG" --out "$OUT")
# An existing checkpoint means an interrupted run: continue it exactly instead of starting over.
if [[ -f "$OUT/checkpoints/latest" ]]; then
  ARGS+=(--resume)
fi
echo "[train.sh] $NAME on $NNODES node(s) x $GPUS_PER_NODE GPU(s) -> $OUT" >&2
exec "${LAUNCH[@]}" -m manifold_fm.cli "${ARGS[@]}" "$@"
