#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD NANOCHAT_BASE_DIR=$PWD/pybase PYTHONUNBUFFERED=1
mkdir -p /tmp/bin .venv/bin && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/bin/python && chmod +x /tmp/bin/python && printf '#!/bin/sh\nexit 0\n' > /tmp/bin/uv && chmod +x /tmp/bin/uv && : > .venv/bin/activate
export PATH=/tmp/bin:$PATH
g0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 320 python3 sess/m3diag.py 2>&1 | grep -v "warn\|^ \|^$"
}
g1() {
  export CUDA_VISIBLE_DEVICES=1 NPROC=1 NANOCHAT_DATA_DIR=$PWD/pyshards
  DEPTHS="4 6 8" RATIO=1 SAVE_EVERY=200 MODEL_FLAGS="--total_batch_size=131072 --eval_tokens=4194304" \
    timeout 430 bash miniseries.sh 2>&1 | grep -v "^step\|warn" | tail -40
  mkdir -p $OUT/mini && cp -r pybase/miniseries/* $OUT/mini/ 2>/dev/null; ls -R pybase/report 2>/dev/null | head; cp pybase/report/*.png pybase/report/*.md $OUT/mini/ 2>/dev/null
}
g0 > $OUT/g0.log 2>&1 &
g1 > $OUT/g1.log 2>&1 &
wait
echo "=== g0"; cat $OUT/g0.log; echo "=== g1"; tail -45 $OUT/g1.log
