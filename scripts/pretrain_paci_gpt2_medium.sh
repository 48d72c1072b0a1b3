#!/usr/bin/env bash
# The PACI paper's recipe, as its reference code runs it: GPT-2 Medium on 8 pipeline
# configs/paci_gpt2_medium.yaml; arguments are overrides; torchrun on this node, or srun inside a
# slurm allocation (see scripts/launch.sh).
exec bash "$(dirname "$0")/launch.sh" configs/paci_gpt2_medium.yaml "$@"
