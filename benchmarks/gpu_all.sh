#!/usr/bin/env bash
# Every GPU figure the project owes, in one call on one GPU machine (at most 7.5 minutes on
# one H100/H200), results as JSON under $OUT. Rehearse it on the CPU first:
#
#   OUT=/tmp/gpu-out benchmarks/gpu_all.sh --smoke     # tiny model, CPU, every code path (~3 min here)
#   benchmarks/gpu_all.sh                              # on the GPU machine ($OUT set by the device tool)
#
# Parts, each under its own time limit so one stuck part cannot eat the others' time, each
# writing $OUT/<part>.json (and $OUT/<part>.log); $OUT/summary.json says which ran and passed:
#   embed        benchmarks/gpu_embed.py: B/32 and L/14 img/s, model alone, nvjpeg, stage with
#                CPU and GPU decoding                            (goals: B/32 >= 15,000, L/14 >= 3,000)
#   train        benchmarks/gpu_train.py: samples/s, TFLOP/s, MFU, memory at the largest batch,
#   train_eager  with compile / without / with activation checkpointing   (goal: L/14 MFU >= 45%)
#   train_ckpt
#   e2e          `dcslurm demo` on a small demo pool, local executor: download from a loopback
#                server, filter, reshard, train (NCCL at world size 1 on a GPU), eval
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SMOKE=()
[[ ${1:-} == --smoke ]] && SMOKE=(--smoke)
OUT=${OUT:-$(mktemp -d /tmp/gpu-all.XXXXXX)}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
declare -A RC

part() {  # part NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  echo "[gpu_all] $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout -s INT -k 20 "$limit" "$@" >"$OUT/$name.log" 2>&1
  RC[$name]=$?
  echo "[gpu_all] $name exited ${RC[$name]} after $((SECONDS - t0)) s"
  tail -n 12 "$OUT/$name.log"
}

if ((${#SMOKE[@]})); then
  E2E=(--samples 120 --seeds 1 --train-samples 256)
  E2E_LIMIT=900 # two CPU trainings of the tiny model on two cores
else
  E2E=(--samples 400 --seeds 1 --train-samples 4096)
  E2E_LIMIT=150
  "$PY" -c 'import torch; print(torch.cuda.get_device_name(0), torch.version.cuda,
        "cudnn", torch.backends.cudnn.version(), "nccl", torch.cuda.nccl.version())' >"$OUT/device.txt" 2>&1
  nvidia-smi >>"$OUT/device.txt" 2>&1
fi

part embed 150 "$PY" benchmarks/gpu_embed.py --samples 10000 ${SMOKE[@]+"${SMOKE[@]}"} --json "$OUT/embed.json"
part train 90 "$PY" benchmarks/gpu_train.py --budget-s 75 ${SMOKE[@]+"${SMOKE[@]}"} --json "$OUT/train.json"
part train_eager 60 "$PY" benchmarks/gpu_train.py --no-compile --budget-s 50 ${SMOKE[@]+"${SMOKE[@]}"} \
  --json "$OUT/train_eager.json"
part train_ckpt 80 "$PY" benchmarks/gpu_train.py --grad-checkpointing --budget-s 65 ${SMOKE[@]+"${SMOKE[@]}"} \
  --json "$OUT/train_ckpt.json"
part e2e "$E2E_LIMIT" "$PY" -m dcslurm.cli demo --out "$OUT/e2e" "${E2E[@]}"
# keep the e2e's small text outputs (logs, metrics, results), not its images
find "$OUT/e2e" -type f \( -name '*.tar' -o -name '*.npz' -o -name '*.npy' -o -name '*.pt' -o -name '*.parquet' \
  -o -name '*.distcp' -o -name '*.png' -o -name '*.jpg' \) -delete 2>/dev/null

"$PY" - "$OUT" "${RC[embed]}" "${RC[train]}" "${RC[train_eager]}" "${RC[train_ckpt]}" "${RC[e2e]}" <<'PYEOF'
import json, sys
out, codes = sys.argv[1], dict(zip(["embed", "train", "train_eager", "train_ckpt", "e2e"], map(int, sys.argv[2:])))
json.dump({"exit_codes": codes, "passed": [k for k, c in codes.items() if c == 0]}, open(f"{out}/summary.json", "w"), indent=1)
print("[gpu_all] summary:", json.dumps(codes))
PYEOF
for c in "${RC[@]}"; do ((c == 0)) || exit 1; done
