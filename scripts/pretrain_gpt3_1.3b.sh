#!/usr/bin/env bash
# GPT-3 XL (1.3B), Table 2.1 of Brown et al. 2020:
# configs/gpt3_1.3b.yaml; arguments are overrides; torchrun on this node, or srun inside a
# slurm allocation (see scripts/launch.sh).
exec bash "$(dirname "$0")/launch.sh" configs/gpt3_1.3b.yaml "$@"
