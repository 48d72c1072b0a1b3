#!/usr/bin/env bash
# GPT-2 Small (125M) on one node. Data and tokenizer come from the environment or
# the config; any section.key=value after the script name overrides the config:
#   DATA=/data/owt_text_document TOKENIZER=/data/tok.model bash scripts/pretrain_gpt2_small.sh train.iters=1000
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
DATA=${DATA:?set DATA to a dataset prefix (PREFIX.bin/PREFIX.idx)}
TOKENIZER=${TOKENIZER:?set TOKENIZER to a sentencepiece .model}
exec torchrun --standalone --nproc_per_node "$NPROC" pretrain_gpt.py \
  --config configs/gpt2_small.yaml \
  data.path="[$DATA]" data.tokenizer="$TOKENIZER" "$@"
