# Sourced by dev/runcpu.sh, dev/cpp_runcpu.sh, dev/test.sh and speedrun.sh: make sure uv exists, then
# create/update .venv from uv.lock and activate it. Safe to run again and again.
set -euo pipefail
export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
    echo "installing uv from PyPI..."
    python3 -m pip install --quiet --user uv 2>/dev/null \
        || python3 -m pip install --quiet --user --break-system-packages uv 2>/dev/null \
        || python3 -m pip install --quiet uv
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# the tpu extra (torch_xla, 80 MB) by default: tests/test_tpu.py runs SPMD on CPU XLA devices, and a
# plain `uv sync` would remove it again between scripts; NANOCHAT_EXTRAS= (empty) leaves it out
uv sync --locked ${NANOCHAT_EXTRAS---extra tpu}
source .venv/bin/activate

# task_fixtures: offline (Hugging Face hub unreachable and no NANOCHAT_TASK_DATA), the task
# loaders read a tiny generated stand-in (tasks/fixtures.py) that exercises every stage but
# teaches nothing; without a system dictionary, its word list for the spelling tasks.
task_fixtures() {
    local dir="$NANOCHAT_BASE_DIR/task_fixtures"
    python -m tasks.fixtures "$dir" > /dev/null
    if [ -z "${NANOCHAT_TASK_DATA:-}" ] && ! python -c "import socket; socket.create_connection(('huggingface.co', 443), timeout=5)" 2>/dev/null; then
        echo "Hugging Face hub unreachable: the tasks use the generated stand-in datasets in $dir"
        export NANOCHAT_TASK_DATA="$dir" HF_HUB_OFFLINE=1
    fi
    [ -n "${NANOCHAT_WORDS_FILE:-}" ] || [ -f /usr/share/dict/words ] || export NANOCHAT_WORDS_FILE="$dir/words.txt"
}
