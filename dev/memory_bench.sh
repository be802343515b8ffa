#!/usr/bin/env bash
# Issue 18's speed checks on one GPU: training tokens/s of d20 (seq 2048, 131,072 tokens per
# step, micro-steps of 65,536) for the baseline, --engram (layers 0,3,6), --mhc (4 streams),
# both, and --mhc with the PyTorch read-out and mix instead of the fused kernels; one JSON line
# per run (base_bench's), prefixed with what ran, appended to $OUT/memory_bench.txt.
#   bash dev/memory_bench.sh                 # ~7 minutes on one H200
#   ONLY="base engram" bash dev/memory_bench.sh
set -uo pipefail
OUT=${OUT:-/tmp}
STEPS=${STEPS:-10}
declare -A RUNS=([base]="" [engram]="--engram --engram_layers=0,3,6" [mhc]="--mhc" [both]="--engram --engram_layers=0,3,6 --mhc"
      [mhc-torch]="--mhc --mhc_kernel=torch")
for name in ${ONLY:-base engram mhc both mhc-torch}; do
  [[ -n "${RUNS[$name]+x}" ]] || { echo "unknown run: $name (base engram mhc both mhc-torch)" >&2; exit 1; }
  # shellcheck disable=SC2086
  python -m scripts.base_bench --depth=20 --max_seq_len=2048 --device_batch_size=32 --total_batch_size=131072 \
    --steps="$STEPS" --warmup=3 ${RUNS[$name]} 2>&1 | tail -1 | sed "s/^/$name /" | tee -a "$OUT/memory_bench.txt"
done
