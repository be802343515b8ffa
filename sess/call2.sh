#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD NANOCHAT_BASE_DIR=$PWD/pybase PYTHONUNBUFFERED=1
g0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 150 python3 -m pytest -q tests/test_gpu.py -k mamba3_triton --tb=short -W ignore 2>&1 | grep -v "^  \|^$" | grep -i "assert\|error\|rel\|tensor\|passed\|failed" | head -20
  timeout 120 python3 -m pytest -q tests/test_mamba3_triton.py --tb=line -W ignore 2>&1 | grep -i "assert\|error\|passed\|failed" | head -20
  OUT=$OUT STEPS=10 M3_KERNELS="triton" ONLY=train2048 timeout 200 bash dev/mamba_bench.sh 2>&1 | tail -3
}
g1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 90 python3 sess/decode_prof.py 2>&1 | grep -v Warn | tail -56
  timeout 100 python3 dev/dsa_bench.py --seq_len=16384 --depth=12 2>&1 | tail -8
  timeout 120 python3 dev/dsa_bench.py 2>&1 | tail -8
  timeout 140 python3 -m scripts.base_train --depth=12 --num_iterations=20 --total_batch_size=262144 --eval_every=-1 --eval_tokens=1048576 \
    --core_metric_every=-1 --sample_every=-1 --data_dir=pyshards --model_tag=hf12 2>&1 | grep -v "^step" | tail -3
  /usr/bin/time -f "export_wall_s=%e" timeout 90 python3 -m scripts.export_hf --source base --model_tag=hf12 --out /tmp/hf12 --remote_code --check --device cuda 2>&1 | tail -8
}
g0 > $OUT/g0.log 2>&1 &
g1 > $OUT/g1.log 2>&1 &
wait
echo "=== g0"; cat $OUT/g0.log; echo "=== g1"; cat $OUT/g1.log
