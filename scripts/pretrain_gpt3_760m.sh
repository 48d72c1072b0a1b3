#!/usr/bin/env bash
# GPT-3 Large (760M), Table 2.1 of Brown et al. 2020:
# configs/gpt3_760m.yaml; arguments are overrides; torchrun on this node, or srun inside a
# slurm allocation (see scripts/launch.sh).
exec bash "$(dirname "$0")/launch.sh" configs/gpt3_760m.yaml "$@"
