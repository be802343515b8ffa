#!/usr/bin/env bash
# The tiny nanochat pipeline on any CPU, on the embedded corpus (no downloads):
# corpus -> tokenizer -> (pretraining etc. as the stages land). Minutes on a laptop.
# Everything goes to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat).
source "$(dirname "$0")/setup.sh"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export NANOCHAT_DATA_DIR="${NANOCHAT_DATA_DIR:-$NANOCHAT_BASE_DIR/embedded_data}"

# 1. the embedded corpus: C++ headers + Python stdlib sources found on this machine
python -m nanochat.corpus --out_dir "$NANOCHAT_DATA_DIR"
# 2. tokenizer: train on it, then compare compression with GPT-2/GPT-4 (if they can be loaded)
python -m scripts.tok_train --vocab_size=32768
python -m scripts.tok_eval
# 3. how fast the data loader feeds a training step
python -m nanochat.dataloader --seconds=5
