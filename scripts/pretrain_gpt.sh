#!/usr/bin/env bash
# One launcher for every model size: bash scripts/pretrain_gpt.sh SIZE [section.key=value ...]
# SIZE names a config: configs/SIZE.yaml (gpt3_1.3b, gpt2_medium, paci_gpt2_medium, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-}
sizes() { for f in configs/*.yaml; do n=$(basename "$f" .yaml); case $n in *base) ;; *) printf ' %s' "$n";; esac; done; }
if [ -z "$SIZE" ] || [ ! -f "configs/$SIZE.yaml" ]; then
  echo "error: no config for size '${SIZE}' (configs/${SIZE:-SIZE}.yaml); sizes:$(sizes)" >&2
  exit 2
fi
shift
exec bash scripts/launch.sh "configs/$SIZE.yaml" "$@"
