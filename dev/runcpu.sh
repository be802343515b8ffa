#!/usr/bin/env bash
# The tiny nanochat pipeline on any CPU, on the embedded corpus (no downloads needed):
# corpus -> tokenizer -> pretraining -> bits per byte -> CORE -> midtraining -> SFT -> RL ->
# chat eval -> report.md. About 7 minutes on 2 cores. The chat stages read the real
# datasets from the Hugging Face hub; offline they use a tiny generated stand-in
# (tasks/fixtures.py), which exercises every stage but teaches nothing.
# Everything goes to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat).
source "$(dirname "$0")/setup.sh"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export NANOCHAT_DATA_DIR="${NANOCHAT_DATA_DIR:-$NANOCHAT_BASE_DIR/embedded_data}"
ITERS=${ITERS:-60}          # pretraining steps (CI runs a shorter profile with ITERS=4)
CORPUS_MB=${CORPUS_MB:-24}  # megabytes of C++ and of Python in the embedded corpus
CHAT_ITERS=${CHAT_ITERS:-20}  # midtraining and SFT steps (RL runs a quarter of it)
TAG=d4  # every stage reads this run's models, not the deepest in $NANOCHAT_BASE_DIR
# the tokenizer is retrained below: models of other runs here would no longer load with it
others=$(ls "$NANOCHAT_BASE_DIR/base_checkpoints" 2>/dev/null | grep -vx "$TAG" || true)
if [ -n "$others" ]; then
    echo "$NANOCHAT_BASE_DIR holds other runs' models ($(echo $others)) that a new tokenizer would orphan:"
    echo "run with another base directory, e.g.  NANOCHAT_BASE_DIR=\$HOME/.cache/nanochat-cpu bash dev/runcpu.sh"
    exit 1
fi

python -m nanochat.report reset
# 1. the embedded corpus: C++ headers + Python stdlib sources found on this machine
python -m nanochat.corpus --out_dir "$NANOCHAT_DATA_DIR" --cpp_mb="$CORPUS_MB" --py_mb="$CORPUS_MB"
# 2. tokenizer: a small vocabulary keeps the CPU model fast (the GPU runs use 32768)
python -m scripts.tok_train --vocab_size=8192 --overwrite  # a rerun retrains every model below
python -m scripts.tok_eval
python -m nanochat.dataloader --seconds=5
# 3. pretrain a 4-layer model for a few minutes
python -m scripts.base_train --depth=4 --max_seq_len=512 --device_batch_size=4 --total_batch_size=2048 \
    --num_iterations="$ITERS" --eval_every=$(( (ITERS + 1) / 2 )) --eval_tokens=8192 --core_metric_every=-1 \
    --sample_every="$ITERS" \
    --device_type=cpu --run=dummy
# 4. evaluate it: bits per byte and samples, then CORE on a few examples per task
python -m scripts.base_loss --device_batch_size=4 --split_tokens=8192 --device_type=cpu --model_tag=$TAG
# exit code 3 means no eval bundle (offline); any other failure stops the script
python -m scripts.base_eval --max_per_task=16 --device_type=cpu --model_tag=$TAG || { rc=$?; [ "$rc" -eq 3 ] || exit "$rc"
    echo "CORE skipped: the DCLM eval bundle could not be downloaded (offline?); see python -m scripts.base_eval --help"; }
# 5. chat stages (offline: the generated stand-in datasets, dev/setup.sh)
task_fixtures
python -m scripts.mid_train --device_batch_size=4 --max_seq_len=512 --total_batch_size=2048 \
    --num_iterations="$CHAT_ITERS" --eval_every="$CHAT_ITERS" --eval_tokens=4096 \
    --simple_spelling=2000 --spelling_bee=2000 --device_type=cpu --model_tag=$TAG
python -m scripts.chat_eval -i mid -x 16 -m 64 --device_type=cpu -g $TAG
python -m scripts.chat_sft --device_batch_size=4 --target_examples_per_step=8 --num_iterations="$CHAT_ITERS" \
    --eval_every="$CHAT_ITERS" --eval_steps=4 --eval_metrics_every=-1 --smoltalk_examples=2000 --device_type=cpu \
    --model_tag=$TAG
python -m scripts.chat_eval -i sft -x 16 -m 64 --device_type=cpu -g $TAG
python -m scripts.chat_rl --examples_per_step=2 --num_samples=4 --max_new_tokens=64 --device_batch_size=8 \
    --num_iterations=$(( (CHAT_ITERS + 3) / 4 )) --eval_every=-1 --eval_examples=8 --device_type=cpu --model_tag=$TAG
python -m scripts.chat_eval -i rl -a GSM8K -x 16 -m 64 --device_type=cpu -g $TAG
# 6. one answer from the chat model in the terminal
python -m scripts.chat_cli -i sft -p "Why is the sky blue?" -m 64 --device_type=cpu -g $TAG
# 7. the report card: ./report.md (and $NANOCHAT_BASE_DIR/report/ with the plots)
python -m nanochat.report generate
echo
echo "Done. Talk to your model in the browser:  source .venv/bin/activate && python -m scripts.chat_web --device_type=cpu"
echo "then open http://127.0.0.1:8000  (or in the terminal: python -m scripts.chat_cli --device_type=cpu)"
