#!/usr/bin/env bash
# Issue 16's speed check on one GPU: base_bench of this tree against an older tree
# (OLD, a directory with that version's nanochat/ and scripts/), interleaved, d12 twice and
# d20 once, window pattern L. One JSON line per run (base_bench's), prefixed with tree, depth and repeat.
#   OLD=oldtree bash dev/bench_core.sh
set -uo pipefail
OLD=${OLD:?OLD=dir of the older nanochat/ and scripts/}
OUT=${OUT:-/tmp}
for run in 12:1 12:2 20:1; do
  depth=${run%:*}; rep=${run#*:}
  {
    for tree in new old; do
      dir=.; [ $tree = old ] && dir=$OLD
      (cd $dir && python -m scripts.base_bench --depth=$depth --window_pattern=L --total_batch_size=524288 \
        --steps=${STEPS:-20} --warmup=3) 2>&1 | tail -1 | sed "s/^/$tree d$depth rep$rep /" | tee -a $OUT/bench_core.txt
    done
  }
done
