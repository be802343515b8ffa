#!/usr/bin/env bash
# The ~$100 nanochat: a d20 model on one 8xH100 node, start to end. Stages that have not
# landed yet are listed at the bottom. Launch inside screen, e.g.
#   screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
# Everything goes to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat).
source "$(dirname "$0")/dev/setup.sh"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NPROC=${NPROC:-1}
WANDB_RUN=${WANDB_RUN:-dummy}

# data: 8 shards now for the tokenizer, the rest (240 ~= 20 tokens/param for d20) in the background
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n 240 &
DATASET_PID=$!
python -m scripts.tok_train --max_chars=2000000000
python -m scripts.tok_eval
wait $DATASET_PID

# pretraining, then bits per byte and CORE
torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_train -- --depth=20 --run="$WANDB_RUN"
torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_loss
torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_eval

# not yet implemented here: mid_train, chat_sft, chat_rl, chat_eval, the report card
