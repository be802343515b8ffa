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
NUM_SHARDS=${NUM_SHARDS:-240}        # ~20 tokens/param for d20 (each shard ~250M chars)
WANDB_RUN=${WANDB_RUN:-dummy}        # set a name to log to wandb
FP8=${FP8:-0}                        # 1: FP8 matmuls in pretraining (H100/H200; +17% tok/s at d20, docs/benchmarks.md)
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 1)}  # not MIG slices
[ "$NPROC" -ge 1 ] 2>/dev/null || NPROC=1

dry() { [ "${DRY_RUN:-0}" != 0 ]; }  # DRY_RUN=0 or unset: run for real
run() { echo "+ $*"; dry || "$@"; }
dry || source dev/setup.sh
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
TORCHRUN="torchrun --standalone --nproc_per_node=$NPROC"

# preflight: every input a later stage needs (word list, eval bundle, task data, disk for
# the checkpoints), fetched now where possible; stops here with a list of fixes, not hours in
run python -m scripts.preflight --depth="$DEPTH" --num_shards="$NUM_SHARDS" ${RL:+--rl}
run python -m nanochat.report reset
# data: 8 shards now for the tokenizer, the rest in the background while it trains
run python -m nanochat.dataset -n 8
run python -m nanochat.dataset -n "$NUM_SHARDS" &
DATASET_PID=$!
trap 'kill $DATASET_PID 2>/dev/null || true' EXIT  # if a step fails, don't leave the download running
run python -m scripts.tok_train --max_chars=2000000000 --overwrite  # a rerun starts over: new tokenizer, new models
run python -m scripts.tok_eval
wait $DATASET_PID

# pretraining, then bits per byte and CORE
run $TORCHRUN -m scripts.base_train -- --depth="$DEPTH" --device_batch_size="$DEVICE_BATCH_SIZE" --run="$WANDB_RUN" --fp8="$FP8"
run $TORCHRUN -m scripts.base_loss -- --device_batch_size="$DEVICE_BATCH_SIZE"
run $TORCHRUN -m scripts.base_eval

# chat stages: identity conversations ship in tasks/; the rest come from the Hugging Face hub
run $TORCHRUN -m scripts.mid_train -- --device_batch_size="$DEVICE_BATCH_SIZE" --run="$WANDB_RUN"
run $TORCHRUN -m scripts.chat_eval -- -i mid
run $TORCHRUN -m scripts.chat_sft -- --run="$WANDB_RUN"
run $TORCHRUN -m scripts.chat_eval -- -i sft
# RL on GSM8K is optional in nanochat's speedrun too: RL=1 bash speedrun.sh
if [ -n "${RL:-}" ]; then
    run $TORCHRUN -m scripts.chat_rl -- --run="$WANDB_RUN"
    run $TORCHRUN -m scripts.chat_eval -- -i rl -a GSM8K
fi
run python -m nanochat.report generate
