#!/usr/bin/env bash
# Issue 17's speed checks on one GPU, all-attention against the AAM hybrid (every Mamba-3 part
# on), one JSON line per run (base_bench's / engine_bench's), prefixed with what ran:
#   training tokens/s, d20, seq 2048 and seq 16384 (the same 65,536 tokens per micro-step),
#     the hybrid once per Mamba-3 kernel in M3_KERNELS (default: "torch triton", i.e. the
#     PyTorch chunked form and nanochat/mamba3_triton.py's fused kernels)
#   engine decode, d12, batch 1 and 128
#   bash dev/mamba_bench.sh                # ~8 minutes on one H200
#   ONLY=train2048 bash dev/mamba_bench.sh # one part: train2048, train16384, engine
#   M3_KERNELS=triton ONLY=train2048 bash dev/mamba_bench.sh  # only the fused kernels' hybrid row
# (engine decode runs the recurrence, not the chunked form: the kernel does not change it)
set -uo pipefail
OUT=${OUT:-/tmp}
STEPS=${STEPS:-10}
M3_KERNELS=${M3_KERNELS:-torch triton}
M3="--mamba --mamba_pattern=AAM --mamba3_qknorm --mamba3_bias --mamba3_complex_rope --mamba3_trapezoidal"
part() { [ -z "${ONLY:-}" ] || [ "$ONLY" = "$1" ]; }
bench() {  # name, then base_bench flags
  local name=$1; shift
  python -m scripts.base_bench --depth=20 --total_batch_size=131072 --steps=$STEPS --warmup=3 "$@" 2>&1 \
    | tail -1 | sed "s/^/$name /" | tee -a $OUT/mamba_bench.txt
}
if part train2048; then
  bench "attn-T2048" --max_seq_len=2048 --device_batch_size=32
  for k in $M3_KERNELS; do
    bench "aam-$k-T2048" --max_seq_len=2048 --device_batch_size=32 $M3 --mamba3_kernel=$k
  done
fi
if part train16384; then
  bench "attn-T16384" --max_seq_len=16384 --device_batch_size=4
  for k in $M3_KERNELS; do
    bench "aam-$k-T16384" --max_seq_len=16384 --device_batch_size=4 $M3 --mamba3_kernel=$k
  done
fi
if part engine; then
  for pattern in "" AAM; do
    python -m scripts.engine_bench --depth=12 --mamba_pattern=$pattern 2>&1 | tail -1 \
      | sed "s/^/engine-${pattern:-attn} /" | tee -a $OUT/mamba_bench.txt
  done
fi
