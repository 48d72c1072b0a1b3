#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite (the second README command).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q -e ".[dev]"
# One thread per process: the suite spawns several processes on a 2-core machine.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
python3 -m ruff check .
# Two workers (pytest-xdist): much of the suite is one process at a time (unit tests, CLI
# runs), which leaves the second core idle; PYTEST_WORKERS=0 runs it serially. One test at
# a time to whichever worker is free, longest first (tests/conftest.py orders them).
workers="${PYTEST_WORKERS:-2}"
sched=()
[ "$workers" != 0 ] && sched=(-n "$workers" --dist load --maxschedchunk 1)
python3 -m pytest -q --timeout=600 "${sched[@]}" "$@" tests
