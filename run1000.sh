#!/usr/bin/env bash
# The ~$1000 nanochat: a d32 model (~1.9B parameters) on one 8xH100 node, ~40 hours.
# The same stages as speedrun.sh with a deeper model, more data and half the device
# batch (to fit in 80 GB). DRY_RUN=1 prints the commands without running them. The
# preflight at the start of speedrun.sh checks the inputs (and disk) for d32.
DEPTH=${DEPTH:-32} DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-16} NUM_SHARDS=${NUM_SHARDS:-800} \
    exec bash "$(dirname "$0")/speedrun.sh"
