# Sourced by dev/runcpu.sh, dev/cpp_runcpu.sh, dev/test.sh and speedrun.sh: make sure uv exists, then
# create/update .venv from uv.lock and activate it. Safe to run again and again.
# NANOCHAT_SYSTEM_PYTHON=1: use the Python environment already on PATH as it is (a container
# or a machine image with torch and the other dependencies installed, no internet): no uv, no .venv.
set -euo pipefail
export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${NANOCHAT_SYSTEM_PYTHON:-}" ]; then
    # the scripts call `python`; images that only have python3 get a stand-in (a function,
    # seen by this shell and the scripts that source this file)
    command -v python >/dev/null 2>&1 || python() { python3 "$@"; }
    if ! missing=$(python -c "
import importlib.util
def gone(m):
    try:
        return importlib.util.find_spec(m) is None
    except ImportError:
        return True
print(' '.join(m for m in ('torch', 'tiktoken', 'rustbpe', 'pyarrow', 'numpy') if gone(m)))") \
        || [ -n "$missing" ]; then
        echo "NANOCHAT_SYSTEM_PYTHON=1 but $(python -c 'import sys; print(sys.executable)' 2>/dev/null || echo python)" \
             "lacks: ${missing:-(it did not run)}." \
             "Install them (pip install $missing), or unset NANOCHAT_SYSTEM_PYTHON to let uv build .venv" >&2
        exit 1
    fi
else
    if ! command -v uv >/dev/null 2>&1; then
        echo "installing uv from PyPI..."
        python3 -m pip install --quiet --user uv 2>/dev/null \
            || python3 -m pip install --quiet --user --break-system-packages uv 2>/dev/null \
            || python3 -m pip install --quiet uv
    fi
    # the tpu extra (torch_xla, 80 MB) by default: tests/test_tpu.py runs SPMD on CPU XLA devices, and a
    # plain `uv sync` would remove it again between scripts; NANOCHAT_EXTRAS= (empty) leaves it out
    uv sync --locked ${NANOCHAT_EXTRAS---extra tpu}
    source .venv/bin/activate
fi

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
