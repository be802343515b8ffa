#!/usr/bin/env bash
# scratch: first device call of this session (two GPUs)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site NANOCHAT_BASE_DIR=$PWD/pybase PYTHONUNBUFFERED=1
python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.device_count())'
g0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 -m pytest -q -x tests/test_gpu.py -k "mamba3_triton or dsa" 2>&1 | tail -15
  timeout 100 python3 sess/decode_prof.py 2>&1 | grep -v Warning | tail -60
  OUT=$OUT STEPS=10 M3_KERNELS="torch triton" ONLY=train2048 timeout 260 bash dev/mamba_bench.sh
}
g1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 120 python3 dev/dsa_bench.py --seq_len=16384 --depth=12 2>&1 | tail -8
  timeout 150 python3 dev/dsa_bench.py 2>&1 | tail -8
  timeout 150 python3 -m scripts.base_train --depth=12 --num_iterations=60 --eval_every=-1 --eval_tokens=1048576 \
    --core_metric_every=-1 --sample_every=-1 --data_dir=pyshards --model_tag=hf12 2>&1 | grep -v "^step" | tail -5
  /usr/bin/time -f "export_wall_s=%e" timeout 100 python3 -m scripts.export_hf --source base --model_tag=hf12 --out /tmp/hf12 --remote_code --check --device cuda 2>&1 | tail -8
}
g0 > $OUT/g0.log 2>&1 &
g1 > $OUT/g1.log 2>&1 &
wait
echo "=== g0"; cat $OUT/g0.log; echo "=== g1"; cat $OUT/g1.log
