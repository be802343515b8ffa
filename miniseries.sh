#!/usr/bin/env bash
# The scaling miniseries (the reference nanochat's of January 2026): base models of
# increasing depth, one after another on all GPUs of the node, each trained at the same
# tokens:params ratio and evaluated (val bpb, CORE); then a table, a power-law fit of
# val bpb against training FLOPs and plots, in the report (docs/miniseries.md: how to read
# them). Re-running skips the finished depths and resumes an unfinished one from its
# last checkpoint.
#   DRY_RUN=1 bash miniseries.sh                      # print the commands, run nothing
#   DEPTHS="4 6 8" NUM_ITERS=200 SAVE_EVERY=50 bash miniseries.sh   # a quick look on one GPU
#   CPU=1 bash miniseries.sh                          # tiny depths on the CPU, embedded corpus (CI)
# Everything goes to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat).
set -euo pipefail
cd "$(dirname "$0")"

# edit the series here (or set these in the environment)
CPU=${CPU:-0}                        # 1: the CPU profile (its own defaults below)
DEPTHS=${DEPTHS:-$([ "$CPU" = 1 ] && echo "1 2 3" || echo "8 10 12 14 16 18 20")}
RATIO=${RATIO:-20}                   # --target_param_data_ratio: tokens = RATIO x params (base_train's default)
MODEL_FLAGS=${MODEL_FLAGS:-}         # more base_train flags for every depth, e.g. "--mamba --mamba_pattern=AAM"
NUM_ITERS=${NUM_ITERS-$([ "$CPU" = 1 ] && echo 30 || true)}  # set: this many steps per depth instead of RATIO
SERIES=${SERIES:-miniseries}         # the models are base_checkpoints/${SERIES}_d<depth>
COMPARE=${COMPARE:-}                 # other base model tags to mark on the plots, e.g. d20 (speedrun.sh's)
DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-32}  # halved above d20, as run1000.sh does, to fit in 80 GB
NUM_SHARDS=${NUM_SHARDS:-370}        # 20 tokens/param for d20 (897M); not downloaded if NANOCHAT_DATA_DIR is set
WANDB_RUN=${WANDB_RUN:-dummy}        # set a name to log to wandb (each depth as NAME_d<depth>)
FP8=${FP8:-0}                        # 1: FP8 matmuls (H100/H200)
NO_BUNDLE=${NO_BUNDLE:-0}            # 1: no CORE (set by the check below when the eval bundle cannot be had)
SAVE_EVERY=${SAVE_EVERY:-$([ "$CPU" = 1 ] && echo 10 || echo 1000)}  # checkpoint steps to resume from
CORE_MAX_PER_TASK=${CORE_MAX_PER_TASK:-$([ "$CPU" = 1 ] && echo 8 || echo -1)}  # -1: every example
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 1)}  # not MIG slices
[ "$NPROC" -ge 1 ] 2>/dev/null || NPROC=1

dry() { [ "${DRY_RUN:-0}" != 0 ]; }  # DRY_RUN=0 or unset: run for real
run() { echo "+ $*"; dry || "$@"; }
dry || source dev/setup.sh
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
TOKENIZER="$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl"

if [ "$CPU" = 1 ]; then
    # the embedded corpus and a small vocabulary, as dev/runcpu.sh (kept if already there)
    export NANOCHAT_DATA_DIR="${NANOCHAT_DATA_DIR:-$NANOCHAT_BASE_DIR/embedded_data}"
    ls "$NANOCHAT_DATA_DIR"/*.parquet >/dev/null 2>&1 || run python -m nanochat.corpus \
        --out_dir "$NANOCHAT_DATA_DIR" --cpp_mb="${CORPUS_MB:-1}" --py_mb="${CORPUS_MB:-1}" --shard_mb=0.25
    [ -f "$TOKENIZER" ] || run python -m scripts.tok_train --vocab_size=4096
    LAUNCH="python -m" SEP=""
    SIZE_FLAGS="--device_type=cpu --max_seq_len=256 --device_batch_size=4 --total_batch_size=1024 --head_dim=64 \
--eval_every=-1 --eval_tokens=8192"
    EVAL_FLAGS="--device_type=cpu"
else
    # preflight (data, disk for the largest depth's checkpoint), data, tokenizer; a tokenizer
    # already there is kept: the models of an earlier run (speedrun.sh's) stay usable
    STAGES=base SHARDS=$NUM_SHARDS
    [ -f "$TOKENIZER" ] || STAGES=tok,$STAGES
    [ -z "${NANOCHAT_DATA_DIR:-}" ] || SHARDS=1  # your own shards: nothing to download
    MAX_DEPTH=$(printf '%s\n' $DEPTHS | sort -n | tail -1)
    run python -m scripts.preflight --stages="$STAGES" --depth="$MAX_DEPTH" --num_shards="$SHARDS"
    if [ -z "${NANOCHAT_DATA_DIR:-}" ]; then
        run python -m nanochat.dataset -n 8
        run python -m nanochat.dataset -n "$NUM_SHARDS"
    fi
    [ -f "$TOKENIZER" ] || run python -m scripts.tok_train --max_chars=2000000000
    # the CORE eval bundle: without it (offline) the series still trains, with CORE left empty
    # (torchrun turns base_eval's "no bundle" exit code 3 into 1, so the check is made here once,
    # and neither base_train nor base_eval spends minutes on retries it cannot win)
    [ "$NO_BUNDLE" = 1 ] || run python -m scripts.preflight --stages=base_eval --min_free_gb=0 || { NO_BUNDLE=1
        echo "warning: no CORE eval bundle: the models train without CORE; a re-run measures it once there is one"; }
    LAUNCH="torchrun --standalone --nproc_per_node=$NPROC -m" SEP="--"
    SIZE_FLAGS="--fp8=$FP8"
    EVAL_FLAGS=""
fi

CORE_EVERY=999999                    # base_train's CORE at its last step only
[ "$NO_BUNDLE" = 0 ] || CORE_EVERY=-1

# one model after another: train (or resume) with CORE at the last step, keep only the last checkpoint
for d in $DEPTHS; do
    TAG="${SERIES}_d$d"
    BATCH=$DEVICE_BATCH_SIZE
    [ "$CPU" = 1 ] || [ "$d" -le 20 ] || BATCH=$(( DEVICE_BATCH_SIZE / 2 ))
    RUN=$WANDB_RUN
    [ "$RUN" = dummy ] || RUN="${WANDB_RUN}_d$d"
    # --num_iterations=-1: the length from the ratio (given even then, so that status sees a change of NUM_ITERS)
    FLAGS="--depth=$d --model_tag=$TAG --target_param_data_ratio=$RATIO --num_iterations=${NUM_ITERS:--1} \
--core_metric_every=$CORE_EVERY --core_metric_max_per_task=$CORE_MAX_PER_TASK --sample_every=-1 --save_every=$SAVE_EVERY \
--run=$RUN"
    [ "$CPU" = 1 ] || FLAGS="$FLAGS --device_batch_size=$BATCH"
    FLAGS="$FLAGS $SIZE_FLAGS $MODEL_FLAGS"
    # fresh | resume | evaluate | done; stops if the checkpoints there were trained with other flags
    STATE=$(python -m scripts.miniseries status --tag="$TAG" -- $FLAGS)
    echo "# d$d ($TAG): $STATE"
    # each model's own report sections and curves, beside the series' report
    export NANOCHAT_REPORT_DIR="$NANOCHAT_BASE_DIR/miniseries/$TAG"
    case "$STATE" in
        fresh) run $LAUNCH scripts.base_train $SEP $FLAGS ;;
        resume) run $LAUNCH scripts.base_train $SEP $FLAGS --resume_from_step=0 ;;
    esac
    [ "$STATE" = done ] || run python -m scripts.miniseries prune --tag="$TAG"
    # CORE comes from training's last step. Without an eval bundle (NO_BUNDLE) it stays empty;
    # else, where training did not measure it, base_eval does (exit code 3: no bundle after all,
    # as on the CPU profile offline); a re-run of the series tries once more
    dry || STATE=$(python -m scripts.miniseries status --tag="$TAG" -- $FLAGS)
    if [ "$STATE" = evaluate ] && [ "$NO_BUNDLE" = 1 ]; then
        echo "CORE skipped for $TAG: no eval bundle (see base_eval --help)"
    elif [ "$STATE" = evaluate ]; then
        run $LAUNCH scripts.base_eval $SEP --model_tag="$TAG" --max_per_task="$CORE_MAX_PER_TASK" $EVAL_FLAGS || {
            rc=$?; [ "$rc" -eq 3 ] || exit "$rc"; echo "CORE skipped for $TAG: no eval bundle (see base_eval --help)"; }
    fi
done
unset NANOCHAT_REPORT_DIR

# the table, the power-law fit and the plots, into the report; then report.md (also ./report.md)
run python -m scripts.miniseries report --series="$SERIES" --depths="$DEPTHS" ${COMPARE:+--compare="$COMPARE"}
