#!/usr/bin/env bash
# A tiny GPT (4 layers, hidden 128) that trains on the CPU: configs/tiny.yaml. Arguments are overrides;
# torchrun on this node, or srun inside a slurm allocation (see scripts/launch.sh).
#   DATA=/data/owt_text_document TOKENIZER=/data/tok.model NPROC=1 \
#     bash scripts/pretrain_tiny.sh train.iters=1000
exec bash "$(dirname "$0")/launch.sh" configs/tiny.yaml "$@"
