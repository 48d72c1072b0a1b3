#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite (the second README command).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q -e ".[dev]"
# One thread per process: the suite spawns several processes on a 2-core machine.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
python3 -m ruff check .
python3 -m pytest -q --timeout=600 "$@" tests
