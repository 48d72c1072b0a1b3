#!/usr/bin/env bash
# Train the same untied model on the same data and seeds with every pipeline schedule
# (P=2, fp32, one thread per process), then project P=8; see docs/results.md.
#   bash scripts/compare_schedules.sh --output docs/results/compare [--quick]
# Options are those of scripts/compare_schedules.py (--help lists them). About 20 minutes
# on 2 CPU cores (--quick: about 2); the wall-clock numbers are only as quiet as the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 WANDB_MODE=disabled
exec python3 scripts/compare_schedules.py "$@"
