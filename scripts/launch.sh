#!/usr/bin/env bash
# Shared launcher behind the per-model-size scripts:
#   bash scripts/launch.sh CONFIG [section.key=value ...]
# NPROC processes on this node through torchrun (default: one per visible GPU, or 1
# without a GPU); DATA (a dataset prefix) and TOKENIZER (a sentencepiece .model)
# override the config's data section when set.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch.sh CONFIG [section.key=value ...]}
shift
ARGS=()
[ -n "${DATA:-}" ] && ARGS+=("data.path=[$DATA]")
[ -n "${TOKENIZER:-}" ] && ARGS+=("data.tokenizer=$TOKENIZER")
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null \
    || echo 1)
fi
exec torchrun --standalone --nproc_per_node "$NPROC" pretrain_gpt.py \
  --config "$CONFIG" "${ARGS[@]}" "$@"
