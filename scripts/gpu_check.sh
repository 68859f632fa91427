#!/usr/bin/env bash
# rank1's GPU path on one GPU in under 10 minutes, printed as one table (scripts/gpu_check.py says what
# each row checks). Needs CUDA torch, transformers and peft; DeepSpeed, Ray and vLLM rows are skipped by
# name where those are absent. Run `python scripts/gpu_check.py --prepare` once where rank1 is installed
# (it copies the model's config and tokenizer, no weights, into .gpu-check/), then this on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -f .gpu-check/model/config.json ]; then
  echo "no .gpu-check/model: run 'python scripts/gpu_check.py --prepare' where rank1 is installed first" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec timeout 570 "$PY" scripts/gpu_check.py "$@"
