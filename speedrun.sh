#!/usr/bin/env bash
# The ~$100 nanochat: a d20 model on one 8xH100 node, start to end, then report.md.
# Launch inside screen, e.g.
#   screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
# DRY_RUN=1 bash speedrun.sh prints every command without running anything.
# Everything goes to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat).
set -euo pipefail
cd "$(dirname "$0")"

# edit the run here (the batch size goes to the token-row stages: base, base_loss, mid)
DEPTH=${DEPTH:-20}
DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-32}
# base_train trains 20 tokens per parameter, value embeddings included: d20 has 897M, so 17.9B
# tokens, ~86B characters at ~4.8 a token, ~345 shards of ~250M characters (+ margin, + val)
NUM_SHARDS=${NUM_SHARDS:-370}
WANDB_RUN=${WANDB_RUN:-dummy}        # set a name to log to wandb
FP8=${FP8:-0}                        # 1: FP8 matmuls in pretraining (H100/H200; +17% tok/s at d20, docs/benchmarks.md)
if [ -z "${NPROC:-}" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then  # the GPUs this process may use
    NPROC=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
fi
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 1)}  # not MIG slices
[ "$NPROC" -ge 1 ] 2>/dev/null || NPROC=1

dry() { [ "${DRY_RUN:-0}" != 0 ]; }  # DRY_RUN=0 or unset: run for real
run() { echo "+ $*"; dry || "$@"; }
dry || source dev/setup.sh
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
TORCHRUN="torchrun --standalone --nproc_per_node=$NPROC"

RL=${RL:-0}  # 1: RL on GSM8K too (optional in nanochat's speedrun as well)
TAG="d$DEPTH"  # every stage reads this run's models, not the deepest in $NANOCHAT_BASE_DIR
# the tokenizer is retrained below: models of other runs here would no longer load with it
others=$(ls "$NANOCHAT_BASE_DIR/base_checkpoints" 2>/dev/null | grep -vx "$TAG" || true)
if [ -n "$others" ] && [ "${REPLACE_RUNS:-0}" = 0 ]; then
    echo "$NANOCHAT_BASE_DIR holds other runs' models ($(echo $others)) that a new tokenizer would orphan: set"
    echo "NANOCHAT_BASE_DIR to another directory, or REPLACE_RUNS=1 to go on anyway"
    exit 1
fi
# preflight: every input a later stage needs (word list, eval bundle, task data, disk for
# the checkpoints), fetched now where possible; stops here with a list of fixes, not hours in
run python -m scripts.preflight --depth="$DEPTH" --num_shards="$NUM_SHARDS" $([ "$RL" != 0 ] && echo --rl)
run python -m nanochat.report reset
# data: 8 shards now for the tokenizer, the rest in the background while it trains
run python -m nanochat.dataset -n 8
run python -m nanochat.dataset -n "$NUM_SHARDS" &
DATASET_PID=$!
# if a step fails, don't leave the download running (its python too, not only the subshell)
trap 'pkill -P $DATASET_PID 2>/dev/null || true; kill $DATASET_PID 2>/dev/null || true' EXIT
run python -m scripts.tok_train --max_chars=2000000000 --overwrite  # a rerun starts over: new tokenizer, new models
run python -m scripts.tok_eval
wait $DATASET_PID

# pretraining, then bits per byte and CORE
run $TORCHRUN -m scripts.base_train -- --depth="$DEPTH" --device_batch_size="$DEVICE_BATCH_SIZE" --run="$WANDB_RUN" --fp8="$FP8"
run $TORCHRUN -m scripts.base_loss -- --device_batch_size="$DEVICE_BATCH_SIZE" --model_tag="$TAG"
run $TORCHRUN -m scripts.base_eval -- --model_tag="$TAG"

# chat stages: identity conversations ship in tasks/; the rest come from the Hugging Face hub
run $TORCHRUN -m scripts.mid_train -- --device_batch_size="$DEVICE_BATCH_SIZE" --run="$WANDB_RUN" --model_tag="$TAG"
run $TORCHRUN -m scripts.chat_eval -- -i mid -g "$TAG"
run $TORCHRUN -m scripts.chat_sft -- --run="$WANDB_RUN" --model_tag="$TAG"
run $TORCHRUN -m scripts.chat_eval -- -i sft -g "$TAG"
# RL on GSM8K is optional in nanochat's speedrun too: RL=1 bash speedrun.sh
if [ "$RL" != 0 ]; then
    run $TORCHRUN -m scripts.chat_rl -- --run="$WANDB_RUN" --model_tag="$TAG"
    run $TORCHRUN -m scripts.chat_eval -- -i rl -a GSM8K -g "$TAG"
fi
run python -m nanochat.report generate
