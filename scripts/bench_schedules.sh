#!/usr/bin/env bash
# Run the three pipeline schedules side by side on this machine (P=2, one thread per
# process) and project the measured costs to deeper pipelines; see docs/benchmarks.md.
#   bash scripts/bench_schedules.sh [--output docs/bench_table.md] [--iters 30] [--rounds 2]
# Options are those of scripts/bench_schedules.py (--help lists them). About 4 minutes on
# 2 CPU cores; run nothing else meanwhile, the numbers are wall-clock throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
exec python3 scripts/bench_schedules.py "$@"
