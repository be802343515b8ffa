#!/usr/bin/env bash
# The ~$1000 nanochat: a d32 model (~1.9B parameters) on one 8xH100 node, ~40 hours.
# Same stages as speedrun.sh, more data and a deeper model; device batch halved to fit.
source "$(dirname "$0")/dev/setup.sh"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
WANDB_RUN=${WANDB_RUN:-dummy}

# d32 at 20 tokens/param needs ~38B tokens: ~800 shards of ~250M characters
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n 800 &
DATASET_PID=$!
python -m scripts.tok_train --max_chars=4000000000
python -m scripts.tok_eval
wait $DATASET_PID

torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_train -- --depth=32 --device_batch_size=8 --run="$WANDB_RUN"
torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_loss --device_batch_size=8
torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_eval

# not yet implemented here: mid_train, chat_sft, chat_rl, chat_eval, the report card
