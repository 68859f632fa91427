#!/usr/bin/env bash
# Submit a rank1 recipe to a running Ray cluster:
#   RAY_ADDRESS=http://HEAD:8265 clusters/submit.sh clusters/recipes/qwen2.5-32b-s1k-sft.yaml [--section.field VALUE ...]
# (after `ray up clusters/ray-cluster-gpu.yaml`, `ray dashboard clusters/ray-cluster-gpu.yaml` forwards
# the dashboard to http://127.0.0.1:8265). Run from the repository root: the working directory is shipped.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: RAY_ADDRESS=http://HEAD:8265 $0 RECIPE.yaml [--section.field VALUE ...]" >&2
  exit 2
fi
RECIPE=$1
shift
if [[ ! -f "$RECIPE" ]]; then  # a path inside the repository: the job runs in its shipped copy
  echo "$0: recipe $RECIPE: no such file" >&2
  exit 2
fi
if [[ -z "${RAY_ADDRESS:-}" ]]; then
  echo "$0: set RAY_ADDRESS to the cluster's job server, e.g. http://127.0.0.1:8265" >&2
  exit 2
fi
if [[ ! -f clusters/runtime_env.yaml ]]; then
  echo "$0: run from the repository root (the recipe and the code are shipped from there)" >&2
  exit 2
fi

ray job submit --address "$RAY_ADDRESS" --runtime-env clusters/runtime_env.yaml --working-dir . \
  -- rank1 train --config "$RECIPE" "$@"
