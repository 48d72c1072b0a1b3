#!/usr/bin/env bash
# GPT-2 Medium (350M): configs/gpt2_medium.yaml. Arguments are overrides;
# torchrun on this node, or srun inside a slurm allocation (see scripts/launch.sh).
#   DATA=/data/owt_text_document TOKENIZER=/data/tok.model NPROC=1 \
#     bash scripts/pretrain_gpt2_medium.sh train.iters=1000
exec bash "$(dirname "$0")/launch.sh" configs/gpt2_medium.yaml "$@"
