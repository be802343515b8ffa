#!/usr/bin/env bash
# cpp_speedrun.sh in a CPU-sized profile: every stage of the C++ pipeline (cpp_data ->
# tokenizer -> base_train with every built extension of the seed's model -> bits per byte
# -> HumanEval-cpp / MBPP-cpp pass@k and FIM infill with g++ -> report.md), on the C++
# standard library headers of the installed compiler, in a few minutes on 2 cores. It
# trains a 4-layer model for a few steps: it shows the pipeline works, it learns nothing.
# Offline, the C++ tasks come from the generated stand-in (tasks/fixtures.py).
# Needs g++ and cargo (Rust). Env: ITERS (training steps), ROOTS (default: libstdc++).
set -euo pipefail
cd "$(dirname "$0")/.."
source dev/setup.sh
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat-cpp}"
ITERS=${ITERS:-10}
# the compiler's own C++ library headers: C++ that is on every machine with g++
ROOTS=${ROOTS:-$(python -c "from nanochat.corpus import compiler_include_dirs as d; print(d()[0])")}
task_fixtures  # offline: the generated stand-in C++ tasks (dev/setup.sh)
# depth 4 is [A, A, M, A]: Engram at 0 and 3, DSA from 3 with a top-k below the context so
# the sparse path runs
# documents of up to 2048 tokens and 10% of them held out: FIM needs held-out ones that compile on their
# own, and shorter pieces rarely do
ROOTS="$ROOTS" DEVICE_TYPE=cpu DEPTH=4 MAX_SEQ_LEN=128 DOC_TOKENS=2048 CPP_DATA_FLAGS="--val_fraction=0.1" DEVICE_BATCH_SIZE=1 TOTAL_BATCH_SIZE=128 \
NUM_ITERATIONS="$ITERS" VOCAB_SIZE=4096 TOK_MAX_CHARS=20000000 MODEL_TAG=cpp_d4 \
MODEL_FLAGS="--window_pattern=L --mamba --mamba_pattern=AAM --mamba3_qknorm --mamba3_bias --mamba3_complex_rope \
--mamba3_trapezoidal --engram --engram_layers=0,3 --mhc --mtp --mtp_lambda=0.3 --dsa --dsa_start_layer=3 \
--dsa_top_k=32 --gradient_checkpointing --fim_rate=0.5" \
TRAIN_FLAGS="--core_metric_every=-1 --save_every=-1 --sample_every=-1 --eval_every=$ITERS --eval_tokens=1024" \
LOSS_FLAGS="--split_tokens=1024" EVAL_FLAGS="-n 2 -t 0.8 -m 16 -x 2 --fim_docs=60 --fim_max_tokens=8" \
    bash cpp_speedrun.sh
