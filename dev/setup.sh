# Sourced by dev/runcpu.sh, dev/test.sh and speedrun.sh: make sure uv exists, then
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
