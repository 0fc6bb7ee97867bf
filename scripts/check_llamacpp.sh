#!/usr/bin/env bash
# The export checks that need llama.cpp itself: builds llama-cpp-python from source into .venv once (about
# 20 min on 2 shared CPU cores, measured), then runs the tests marked `llamacpp` (GGUF adapter on its base,
# fused GGUF in f32/f16/bf16/q8_0, qwen2, Ollama folders, real SmolLM2). Run after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
if ! python -c "import llama_cpp" 2>/dev/null; then
  start=$(date +%s)
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=off}" python -m pip install -q 'llama-cpp-python>=0.3.16'
  echo "llama-cpp-python built in $(( $(date +%s) - start )) s"
fi
exec python -m pytest -q -ra -m llamacpp tests/test_export_gguf.py tests/test_export_ollama.py "$@"
