#!/usr/bin/env bash
# A tiny GPT (4 layers, hidden 128) on the CPU. Data and tokenizer come from the environment or
# the config; any section.key=value after the script name overrides the config:
#   DATA=/data/owt_text_document TOKENIZER=/data/tok.model bash scripts/pretrain_tiny.sh train.iters=1000
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
DATA=${DATA:?set DATA to a dataset prefix (PREFIX.bin/PREFIX.idx)}
TOKENIZER=${TOKENIZER:?set TOKENIZER to a sentencepiece .model}
exec torchrun --standalone --nproc_per_node "$NPROC" pretrain_gpt.py \
  --config configs/tiny.yaml \
  data.path="[$DATA]" data.tokenizer="$TOKENIZER" "$@"
