#!/usr/bin/env bash
# FID-50K of one trained run at several guidance scales: sample with `accelerate launch` (sharded over the GPUs),
# write the ADM-layout .npz (uint8 NHWC arr_0 + labels arr_1, readable by the ADM TensorFlow evaluator), then
# FID + Inception Score through torch-fidelity against the ADM reference statistics (mu, sigma).
#
#   bash experiments/imagenet_sfm/scripts/sample_eval.sh RUN REFERENCE_NPZ INCEPTION_WEIGHTS
#   e.g. RUN=runs/flux2-B2-spherical-80ep  REFERENCE_NPZ=ref/VIRTUAL_imagenet256_labeled.npz
#        INCEPTION_WEIGHTS=weights/pt_inception-2015-12-05-6726825d.pth
#
# Writes RUN/fid<NUM>-cfg<S>/{samples.npz, grid.png, sample_info.json, metrics.json} per scale S and prints a table.
# Samples already written are reused (delete the folder to resample). Classes cycle 0..999, so NUM=50000 gives
# exactly 50 images per class. Several nodes: run the same command on every node with NNODES / NODE_RANK /
# MASTER_ADDR (as train.sh); RUN must be on a filesystem all nodes share (the shards are merged by rank 0), and only
# node 0 evaluates. Environment:
#   NUM (50000), SCALES ("1.0 1.5 2.0"), METHOD / STEPS / PRECISION (default: the run config's sample section;
#   its precision auto is bf16 on GPUs, PRECISION=fp32 for IEEE float32), CFG_INTERVAL ("LO HI", default none),
#   BATCH (per process, 125), SEED (0), GPUS_PER_NODE (all visible),
#   NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (29500),
#   EVAL_ARGS (extra `manifold-fm evaluate` options, e.g. "--precision bf16"; its default is fp32, the arithmetic of
#   the reference statistics), ACCELERATE (launcher, accelerate), PYTHON (the interpreter, python3),
#   MANIFOLD_FM (how to run the CLI, "$PYTHON -m manifold_fm.cli").
set -euo pipefail
if [[ $# -ne 3 ]]; then
  echo "usage: $0 RUN REFERENCE_NPZ INCEPTION_WEIGHTS" >&2
  exit 2
fi
RUN="$1"; REF="$2"; WEIGHTS="$3"
for f in "$REF" "$WEIGHTS"; do
  [[ -f "$f" ]] || { echo "error: $f does not exist (nothing is downloaded; supply it locally)" >&2; exit 2; }
done
[[ -d "$RUN" ]] || { echo "error: run folder $RUN does not exist" >&2; exit 2; }
NUM="${NUM:-50000}"
SCALES="${SCALES:-1.0 1.5 2.0}"
BATCH="${BATCH:-125}"
SEED="${SEED:-0}"
PYTHON="${PYTHON:-python3}"  # every Python 3 install has python3 (the GPU image has no python)
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
read -r -a CLI <<< "${MANIFOLD_FM:-$PYTHON -m manifold_fm.cli}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))
LAUNCH=("${ACCELERATE:-accelerate}" launch --num_processes "$NUM_PROCESSES")
if [[ "$NNODES" -gt 1 ]]; then
  LAUNCH+=(--num_machines "$NNODES" --machine_rank "$NODE_RANK" --main_process_ip "${MASTER_ADDR:-localhost}"
           --main_process_port "${MASTER_PORT:-29500}")
fi
if [[ "$NUM_PROCESSES" -gt 1 ]]; then
  LAUNCH+=(--multi_gpu)
fi
SAMPLER=()
[[ -n "${METHOD:-}" ]] && SAMPLER+=(--method "$METHOD")
[[ -n "${STEPS:-}" ]] && SAMPLER+=(--steps "$STEPS")
[[ -n "${PRECISION:-}" ]] && SAMPLER+=(--precision "$PRECISION")
if [[ -n "${CFG_INTERVAL:-}" ]]; then
  read -r -a interval <<< "$CFG_INTERVAL"
  SAMPLER+=(--cfg-interval "${interval[0]}" "${interval[1]}")
fi
read -r -a EXTRA <<< "${EVAL_ARGS:-}"

for s in $SCALES; do
  out="$RUN/fid${NUM}-cfg${s}"
  if [[ -f "$out/samples.npz" ]]; then
    echo "[sample_eval] reusing $out/samples.npz" >&2
  else
    echo "[sample_eval] sampling $NUM images at CFG $s -> $out" >&2
    "${LAUNCH[@]}" -m manifold_fm.cli sample "$RUN" --num "$NUM" --cfg-scale "$s" --batch-size "$BATCH" \
      --seed "$SEED" --out "$out" "${SAMPLER[@]}"
  fi
  if [[ "$NODE_RANK" -ne 0 ]]; then
    continue  # node 0 merges the shards and evaluates
  fi
  # Reference stats -> FID (precision/recall need reference images, so they are skipped) + IS.
  "${CLI[@]}" evaluate "$out/samples.npz" --reference "$REF" --inception-weights "$WEIGHTS" --no-prc \
    --out "$out/metrics.json" "${EXTRA[@]}"
done
if [[ "$NODE_RANK" -ne 0 ]]; then
  exit 0
fi

"$PYTHON" - "$RUN" "$NUM" $SCALES <<'PY'
import json, sys
from pathlib import Path
run, num, scales = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
print(f"| run | CFG | {'FID-' + str(int(num) // 1000) + 'K' if int(num) >= 1000 else 'FID'} | IS |")
print("| --- | --- | --- | --- |")
for s in scales:
    path = run / f"fid{num}-cfg{s}" / "metrics.json"
    if not path.is_file():
        continue
    m = json.loads(path.read_text())
    fid = m.get("fid", next((v for k, v in m.items() if k.startswith("fd[")), float("nan")))
    print(f"| {run.name} | {s} | {fid:.2f} | {m.get('inception_score_mean', float('nan')):.2f} |")
PY
