#!/usr/bin/env bash
# Shared launcher behind the per-model-size scripts:
#   bash scripts/launch.sh CONFIG [section.key=value ...]
# Outside slurm: NPROC processes on this node through torchrun (default: one per
# visible GPU, or 1 without a GPU). Inside a slurm allocation (SLURM_JOB_ID set, under
# sbatch or salloc): srun starts the allocation's tasks (one per GPU), each a plain
# `python pretrain_gpt.py` that reads its rank from slurm; NPROC, when set, is the
# tasks per node. With --print one plain process prints the resolved config.
# DATA (a dataset prefix) and TOKENIZER (a sentencepiece .model) override the
# config's data section when set.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
CONFIG=${1:?usage: launch.sh CONFIG [section.key=value ...]}
shift
ARGS=(--config "$CONFIG")
[ -n "${DATA:-}" ] && ARGS+=("data.path=[$DATA]")
[ -n "${TOKENIZER:-}" ] && ARGS+=("data.tokenizer=$TOKENIZER")
for arg in "$@"; do
  if [ "$arg" = --print ]; then  # printing needs no process group
    exec python pretrain_gpt.py "${ARGS[@]}" "$@"
  fi
done
if [ -n "${SLURM_JOB_ID:-}" ]; then
  source "$HERE/slurm/rendezvous.sh"
  SRUN=(srun)
  [ -n "${NPROC:-}" ] && SRUN+=(--ntasks-per-node "$NPROC")
  exec "${SRUN[@]}" python pretrain_gpt.py "${ARGS[@]}" "$@"
fi
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null \
    || echo 1)
fi
# torchrun_quiet.py drops torchrun's own ~25-line report of a failed worker (the
# worker's error: lines say what went wrong) and exits with the worker's code.
exec python3 "$HERE/torchrun_quiet.py" torchrun --standalone --nproc_per_node "$NPROC" \
  pretrain_gpt.py "${ARGS[@]}" "$@"
