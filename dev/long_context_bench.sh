#!/usr/bin/env bash
# Issue 19's long-context table on one GPU: training tokens/s and peak memory at each context
# length in SEQS, dense attention against DSA (from layer 7, the sparse stage, top-k 2048),
# with and without per-block gradient checkpointing; device batch 1, 65,536 tokens a step
# (64K: one sequence). One JSON line per run (base_bench's), prefixed with what ran, appended
# to $OUT/long_context_bench.txt; a run that fails (e.g. out of memory) prints its last line, one
# that runs past RUN_TIMEOUT seconds (default 900; compiling at 64K takes minutes) says so.
#   bash dev/long_context_bench.sh                                  # d20: 16K, 32K, 64K x dense/dsa x ckpt 0/1
#   SEQS=65536 MODES=dsa CKPT=1 DEPTH=24 bash dev/long_context_bench.sh   # the seed's d24 at 64K
#   DEPTH=2 SEQS=256 TOKENS=512 STEPS=1 EXTRA="--device_type=cpu --compile=0 --dsa_top_k=64 --dsa_start_layer=1" bash dev/long_context_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}; DEPTH=${DEPTH:-20}; SEQS=${SEQS:-"16384 32768 65536"}; MODES=${MODES:-"dense dsa"}
CKPT=${CKPT:-"0 1"}; TOKENS=${TOKENS:-65536}; STEPS=${STEPS:-5}; EXTRA=${EXTRA:-}; RUN_TIMEOUT=${RUN_TIMEOUT:-900}
ROPE=${ROPE:-5000000}  # docs/model.md "Rotary base for long contexts": enough for 64K at head dim 128
for seq in $SEQS; do
  for mode in $MODES; do
    flags=""
    [ "$mode" = dsa ] && flags="--dsa"
    for ckpt in $CKPT; do
      name="d$DEPTH-T$seq-$mode-ckpt$ckpt"
      ck=""
      [ "$ckpt" = 1 ] && ck="--gradient_checkpointing"
      # shellcheck disable=SC2086
      last=$(timeout "$RUN_TIMEOUT" python -m scripts.base_bench --depth="$DEPTH" --max_seq_len="$seq" \
        --device_batch_size=1 --total_batch_size="$TOKENS" --steps="$STEPS" --warmup=2 --rope_base="$ROPE" \
        $ck $flags $EXTRA 2>&1 | tail -1)
      [ $? = 124 ] && last="timed out after $RUN_TIMEOUT s (RUN_TIMEOUT)"  # (pipefail: timeout's status)
      echo "$name $last" | tee -a "$OUT/long_context_bench.txt"
    done
  done
done
