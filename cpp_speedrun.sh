#!/usr/bin/env bash
# The C++ code model, start to end: your C++ repositories -> pretraining shards
# (tools/cpp_chunker, compilable mode) -> a tokenizer trained on that C++ -> base_train
# with the seed's model (d24 AAM Mamba-3 hybrid, Engram, mHC, MTP, DSA, FIM, 64K context)
# -> bits per byte on held-out C++ -> C++ evals (HumanEval-cpp / MBPP-cpp pass@k, FIM
# infill) -> report.md; then chat_web serves it.
#   ROOTS="$HOME/src/fmt $HOME/src/json" bash cpp_speedrun.sh
#   ROOTS_FILE=roots.txt bash cpp_speedrun.sh     # one repository root per line
# DRY_RUN=1 prints every command without running anything. dev/cpp_runcpu.sh runs a tiny
# version on a CPU. Everything goes to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat):
# use a fresh one per tokenizer, since every model in a base dir shares its tokenizer.
set -euo pipefail
cd "$(dirname "$0")"

# edit the run here (the seed's launch command, shared/ARCHITECTURE.md)
ROOTS=${ROOTS:-}                      # C++ repository roots, space separated
ROOTS_FILE=${ROOTS_FILE:-}            # or a file of them
MODE=${MODE:-compilable}              # cpp_data mode: file, crossfile, project, compilable
CPP_DATA_FLAGS=${CPP_DATA_FLAGS:-}    # more cpp_data flags, e.g. --dedup=exact --val_fraction=0.02
DEPTH=${DEPTH:-24}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-65536}
DOC_TOKENS=${DOC_TOKENS:-$MAX_SEQ_LEN}  # cpp_data's token budget per document
DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-1}
TOTAL_BATCH_SIZE=${TOTAL_BATCH_SIZE:-524288}
NUM_ITERATIONS=${NUM_ITERATIONS:-50000}  # the seed's; -1: the token:param ratio decides
VOCAB_SIZE=${VOCAB_SIZE:-32768}
TOK_MAX_CHARS=${TOK_MAX_CHARS:-2000000000}
MODEL_TAG=${MODEL_TAG:-cpp_d$DEPTH}
MODEL_FLAGS=${MODEL_FLAGS:-"--window_pattern=L --mamba --mamba_pattern=AAM --mamba3_qknorm --mamba3_bias \
--mamba3_complex_rope --mamba3_trapezoidal --engram --engram_layers=0,3,6 --mhc --mtp --mtp_lambda=0.3 \
--dsa --dsa_start_layer=7 --gradient_checkpointing --fim_rate=0.5 --rope_base=10000000"}
# rope_base 1e7: Men et al. 2024's bound for 64K tokens at head dim 128 (docs/model.md, "Rotary base")
TRAIN_FLAGS=${TRAIN_FLAGS:-"--core_metric_every=-1 --save_every=5000 --sample_every=5000"}  # CORE is English text
EVAL_FLAGS=${EVAL_FLAGS:-"-n 10 -t 0.8"}  # C++ pass@1 and pass@10 from 10 samples per problem
LOSS_FLAGS=${LOSS_FLAGS:-}            # base_loss, e.g. --split_tokens=N
WANDB_RUN=${WANDB_RUN:-dummy}
DEVICE_TYPE=${DEVICE_TYPE:-}          # cpu: one plain process (dev/cpp_runcpu.sh)
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 1)}
[ "$NPROC" -ge 1 ] 2>/dev/null || NPROC=1

dry() { [ "${DRY_RUN:-0}" != 0 ]; }
run() { echo "+ $*"; dry || "$@"; }
dry || source dev/setup.sh
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
DATA_DIR=${DATA_DIR:-$NANOCHAT_BASE_DIR/cpp_data}
if [ -n "$DEVICE_TYPE" ]; then
    LAUNCH="python"; DEV="--device_type=$DEVICE_TYPE"
else
    LAUNCH="torchrun --standalone --nproc_per_node=$NPROC"; DEV=""
fi
# (torchrun passes what follows "--" to the script; plain python takes the flags directly)
sep() { [ -n "$DEVICE_TYPE" ] || echo "--"; }

if [ -n "$ROOTS_FILE" ]; then ROOTS_ARGS=(--roots_file "$ROOTS_FILE")
elif [ -n "$ROOTS" ]; then read -ra R <<< "$ROOTS"; ROOTS_ARGS=(--roots "${R[@]}")
else echo "set ROOTS (C++ repository roots, space separated) or ROOTS_FILE (one per line)" >&2; exit 1; fi
# The seed's flags this script leaves out: TPU-only ones (docs/TPU_SETUP.md has the TPU
# launch), --no_compile (the seed's for XLA; on GPUs torch.compile is the fast path) and
# --streaming_data (the seed's shards arrived while it trained; here cpp_data ends first).
echo "cpp_speedrun: the seed's --tensor_parallel, --xla_flash_attn, --no_compile and --streaming_data are left out (TPU / streaming only)"

# preflight: cargo (cpp_chunker), g++ and the C++ task data, before hours of training
run python -m scripts.preflight --stages=cpp,tok --depth="$DEPTH"
run python -m nanochat.report reset
# data: built once; delete $DATA_DIR (or pass your own DATA_DIR) to rebuild
if [ -f "$DATA_DIR/manifest.json" ]; then
    echo "cpp_speedrun: reusing the shards in $DATA_DIR"
else
    run python -m scripts.cpp_data "${ROOTS_ARGS[@]}" --mode="$MODE" --max_tokens="$DOC_TOKENS" --out="$DATA_DIR" \
        $CPP_DATA_FLAGS
fi
run python -m scripts.tok_train --data_dir="$DATA_DIR" --vocab_size="$VOCAB_SIZE" --max_chars="$TOK_MAX_CHARS" --overwrite
run python -m scripts.tok_eval --data_dir="$DATA_DIR"

# pretraining, then bits per byte on the held-out C++ and the C++ evals
# shellcheck disable=SC2086
run $LAUNCH -m scripts.base_train $(sep) $DEV --depth="$DEPTH" --max_seq_len="$MAX_SEQ_LEN" \
    --device_batch_size="$DEVICE_BATCH_SIZE" --total_batch_size="$TOTAL_BATCH_SIZE" \
    --num_iterations="$NUM_ITERATIONS" --data_dir="$DATA_DIR" --model_tag="$MODEL_TAG" --run="$WANDB_RUN" \
    $MODEL_FLAGS $TRAIN_FLAGS
# shellcheck disable=SC2086
run $LAUNCH -m scripts.base_loss $(sep) $DEV --data_dir="$DATA_DIR" --model_tag="$MODEL_TAG" \
    --device_batch_size="$DEVICE_BATCH_SIZE" $LOSS_FLAGS
# shellcheck disable=SC2086
run $LAUNCH -m scripts.base_eval $(sep) $DEV --model_tag="$MODEL_TAG" --core=0 --cpp=1 --fim="$DATA_DIR" $EVAL_FLAGS
run python -m nanochat.report generate
echo
echo "Done. Serve the C++ model (it completes code; chat_web's suffix box fills in the middle):"
echo "  source .venv/bin/activate && python -m scripts.chat_web -i base -g $MODEL_TAG ${DEV}"
