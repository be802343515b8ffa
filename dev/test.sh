#!/usr/bin/env bash
# Runs the whole test suite. This is the command README names and .ci/run calls.
# pytest exits 5 when it collects no tests; under `set -e` that fails this script too.
# --durations: the slowest tests at the end, to keep CI's time in view.
# Two pytest-xdist workers by default (CI's machine has two cores; most tests are single-threaded
# subprocesses), each taking whole files (a file's module fixtures, e.g. the XLA worker or the
# browser, are then built once): TEST_WORKERS=4 for more, TEST_WORKERS=0 for one process.
source "$(dirname "$0")/setup.sh"
python -m pytest tests -n "${TEST_WORKERS:-2}" --dist loadfile --durations=40 "$@"
