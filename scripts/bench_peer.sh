#!/usr/bin/env bash
# This project against plain PyTorch and torch.distributed.pipelining on the same GPT, on
# this machine (one process and P=2, one thread per process); see docs/benchmarks.md.
#   bash scripts/bench_peer.sh [--shapes small compute] [--micro-batches 2 4] [--rounds 3]
#   bash scripts/bench_peer.sh --profile --shapes small --micro-batches 2   # where time goes
#   bash scripts/bench_peer.sh --quick                                      # a check, ~2 min
# Options are those of scripts/bench_peer.py (--help lists them). About 5 minutes per shape
# and M for 3 rounds on 2 CPU cores; run nothing else meanwhile, the numbers are wall-clock.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
exec python3 scripts/bench_peer.py "$@"
