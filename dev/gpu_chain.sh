#!/usr/bin/env bash
# Every stage on one GPU at GPU sizes (seq 2048, bf16, torch.compile, CUDA-graph decoding),
# offline: the embedded corpus for pretraining and the generated task stand-in
# (tasks/fixtures.py) for the chat stages. A check that the whole chain runs for a few
# hundred steps of a d12 without error, not a way to get a good model (use speedrun.sh).
#   bash dev/gpu_chain.sh                 # ~10 minutes on one H100/H200
#   PY=python3 DEPTH=12 BASE_ITERS=300 CHAT_ITERS=200 RL_ITERS=20 bash dev/gpu_chain.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
DEPTH=${DEPTH:-12}
BASE_ITERS=${BASE_ITERS:-300}   # pretraining steps of 131,072 tokens
CHAT_ITERS=${CHAT_ITERS:-200}   # midtraining and SFT steps
RL_ITERS=${RL_ITERS:-20}        # RL steps (each samples 8 problems x 8 completions)
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export NANOCHAT_DATA_DIR="${NANOCHAT_DATA_DIR:-$NANOCHAT_BASE_DIR/embedded_data}"
FIXTURES="$NANOCHAT_BASE_DIR/task_fixtures"
export NANOCHAT_TASK_DATA="${NANOCHAT_TASK_DATA:-$FIXTURES}" HF_HUB_OFFLINE=1
[ -f /usr/share/dict/words ] || export NANOCHAT_WORDS_FILE="${NANOCHAT_WORDS_FILE:-$FIXTURES/words.txt}"
run() { echo "+ $*"; "$@"; }

run $PY -m nanochat.report reset
[ -n "$(ls "$NANOCHAT_DATA_DIR"/*.parquet 2>/dev/null)" ] || run $PY -m nanochat.corpus --out_dir "$NANOCHAT_DATA_DIR"
[ -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ] || run $PY -m scripts.tok_train --vocab_size=32768
run $PY -m tasks.fixtures "$FIXTURES" > /dev/null
run $PY -m scripts.base_train --depth="$DEPTH" --total_batch_size=131072 --num_iterations="$BASE_ITERS" \
    --eval_every=100 --eval_tokens=524288 --core_metric_every=-1 --sample_every="$BASE_ITERS"
run $PY -m scripts.base_loss --split_tokens=524288 --model_tag="d$DEPTH"
run $PY -m scripts.base_eval --max_per_task=64 --bundle_dir=tests/fixtures/eval_bundle --model_tag="d$DEPTH"
run $PY -m scripts.mid_train --model_tag="d$DEPTH" --total_batch_size=131072 --num_iterations="$CHAT_ITERS" --eval_every=100 \
    --eval_tokens=524288 --simple_spelling=20000 --spelling_bee=20000
run $PY -m scripts.chat_eval -i mid -x 64 -m 128 -g "d$DEPTH"
run $PY -m scripts.chat_sft --model_tag="d$DEPTH" --num_iterations="$CHAT_ITERS" --eval_every=100 --eval_steps=8 \
    --eval_metrics_every="$CHAT_ITERS" --eval_metrics_max_problems=64 --smoltalk_examples=5000
run $PY -m scripts.chat_eval -i sft -x 64 -m 128 -g "d$DEPTH"
run $PY -m scripts.chat_rl --model_tag="d$DEPTH" --examples_per_step=8 --num_samples=8 --device_batch_size=32 --max_new_tokens=128 \
    --num_iterations="$RL_ITERS" --eval_every="$RL_ITERS" --eval_examples=32 --save_every=-1
run $PY -m scripts.chat_eval -i rl -a GSM8K -x 64 -m 128 -g "d$DEPTH"
run $PY -m scripts.chat_cli -i sft -p "Why is the sky blue?" -m 64 -g "d$DEPTH"
run $PY -m nanochat.report generate
echo "gpu_chain: every stage ran"
