#!/usr/bin/env bash
# The ~$1000 nanochat: a d32 model (2.8B parameters, value embeddings included) on one 8xH100 node.
# The same stages as speedrun.sh with a deeper model, more data and half the device
# batch (to fit in 80 GB): 20 tokens per parameter = 56B tokens, ~1,085 shards of ~250M
# characters (+ margin, + val). DRY_RUN=1 prints the commands without running them. The
# preflight at the start of speedrun.sh checks the inputs (and disk) for d32.
DEPTH=${DEPTH:-32} DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-16} NUM_SHARDS=${NUM_SHARDS:-1150} \
    exec bash "$(dirname "$0")/speedrun.sh"
