#!/usr/bin/env bash
# Runs the whole test suite. This is the command README names and .ci/run calls.
# pytest exits 5 when it collects no tests; under `set -e` that fails this script too.
# --durations: the slowest tests at the end, to keep CI's time in view.
source "$(dirname "$0")/setup.sh"
python -m pytest tests --durations=40 "$@"
