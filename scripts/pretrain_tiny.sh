#!/usr/bin/env bash
# A tiny GPT (4 layers, hidden 128) that trains on the CPU on one node: configs/tiny.yaml.
#   DATA=/data/owt_text_document TOKENIZER=/data/tok.model NPROC=1 \
#     bash scripts/pretrain_tiny.sh train.iters=1000
exec bash "$(dirname "$0")/launch.sh" configs/tiny.yaml "$@"
