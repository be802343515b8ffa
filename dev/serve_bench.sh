#!/usr/bin/env bash
# chat_web under load on this machine, as docs/benchmarks.md ("Continuous batching") measures
# it: a random-weight chat model (dev/random_checkpoint.py; made if $NANOCHAT_BASE_DIR has no
# d$DEPTH sft checkpoint), served with --batch_slots, then dev/loadtest.py once per entry of
# LOADS (client counts, run in order on the same server: the first load meets a cold server).
# REF=DIR serves a second copy of the code from DIR (e.g. `git worktree add /tmp/ref HEAD~1`)
# on REF_PORT (default: the next port) at the same time, and each load then runs against both
# in turn (one idle while the other is measured). One JSON line per load, prefixed with "main" or "ref".
# REF_FLAGS: the second server's chat_web flags (default WEB_FLAGS); REF=. with other flags
# compares two settings of this code, e.g. REF=. REF_FLAGS="--bf16_linears=1".
# SPREAD=0.5: each request's max_tokens within +-50% (loadtest --max_tokens_spread; default 0:
# all answers end in the same step, round after round).
# Needs a tokenizer in $NANOCHAT_BASE_DIR (python -m scripts.tok_train).
#   bash dev/serve_bench.sh                                   # d20, 128 slots, loads 128 128 32
#   DEPTH=2 SLOTS=8 LOADS="4 4" SECONDS_EACH=5 MAX_TOKENS=16 PROCS=2 WEB_FLAGS="--device_type=cpu" bash dev/serve_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEPTH=${DEPTH:-20}; SLOTS=${SLOTS:-128}; LOADS=${LOADS:-"128 128 32"}; SECONDS_EACH=${SECONDS_EACH:-30}
MAX_TOKENS=${MAX_TOKENS:-256}; PROCS=${PROCS:-8}; PORT=${PORT:-8000}; WEB_FLAGS=${WEB_FLAGS:-}; REF=${REF:-}
REF_FLAGS=${REF_FLAGS:-$WEB_FLAGS}; REF_PORT=${REF_PORT:-$((PORT + 1))}
SPREAD=${SPREAD:-0}
BASE=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
if [ ! -d "$BASE/chatsft_checkpoints/d$DEPTH" ]; then
    python dev/random_checkpoint.py --depth="$DEPTH" || exit 1
fi
pids=()
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
serve() {  # name, code directory, port, chat_web flags
    # shellcheck disable=SC2086
    (cd "$2" && exec python -m scripts.chat_web -i sft -g "d$DEPTH" --batch_slots="$SLOTS" --port "$3" $4) \
        > "/tmp/serve_bench_$1.log" 2>&1 &
    pids+=($!)
}
serve main . "$PORT" "$WEB_FLAGS"
targets=("main:$PORT")
if [ -n "$REF" ]; then
    serve ref "$REF" "$REF_PORT" "$REF_FLAGS"
    targets+=("ref:$REF_PORT")
fi
for t in "${targets[@]}"; do  # wait until each serves (it warms up first: minutes for a d20 on a GPU)
    until curl -sf "http://127.0.0.1:${t#*:}/stats" > /dev/null; do
        for p in "${pids[@]}"; do
            kill -0 "$p" 2>/dev/null || { echo "a server exited; its log:" >&2; tail -n 20 /tmp/serve_bench_*.log >&2; exit 1; }
        done
        sleep 1
    done
done
for clients in $LOADS; do
    for t in "${targets[@]}"; do
        python dev/loadtest.py --url "http://127.0.0.1:${t#*:}" --clients "$clients" --procs "$PROCS" \
            --seconds "$SECONDS_EACH" --max_tokens "$MAX_TOKENS" --max_tokens_spread "$SPREAD" | sed "s/^/${t%%:*} /" || exit 1
    done
done
