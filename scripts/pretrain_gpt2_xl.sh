#!/usr/bin/env bash
# GPT-2 XL (1558M parameters as counted with GPT-2's 50257-token vocabulary and 1024
# configs/gpt2_xl.yaml; arguments are overrides; torchrun on this node, or srun inside a
# slurm allocation (see scripts/launch.sh).
exec bash "$(dirname "$0")/launch.sh" configs/gpt2_xl.yaml "$@"
