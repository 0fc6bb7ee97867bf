#!/usr/bin/env bash
# The export checks that need llama.cpp itself (pytest marker `llamacpp`): GGUF adapter on its base, fused
# GGUF in f32/f16/bf16/q8_0, qwen2, Llama-3 rope scaling, Ollama folders, real SmolLM2, and llama.cpp's own
# convert_lora_to_gguf.py on the PEFT export. Builds llama-cpp-python from source into .venv once (20 min
# measured on 2 busy CPU cores: too long for CI) and unpacks its llama.cpp tree for the converter.
# Run after scripts/setup.sh; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
if ! python -c "import llama_cpp" 2>/dev/null; then
  start=$(date +%s)
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=off}" python -m pip install -q 'llama-cpp-python>=0.3.16'
  echo "llama-cpp-python built in $(( $(date +%s) - start )) s"
fi
if [ -z "${LLAMA_CPP_SRC:-}" ]; then
  version=$(python -c "import llama_cpp; print(llama_cpp.__version__)")
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/streamtune/llama-cpp-python-$version"
  if [ ! -f "$cache/vendor/llama.cpp/convert_lora_to_gguf.py" ]; then
    tmp=$(mktemp -d)
    python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp"
    mkdir -p "$cache"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$cache" --strip-components=1
    rm -rf "$tmp"
  fi
  export LLAMA_CPP_SRC="$cache/vendor/llama.cpp"
fi
exec python -m pytest -q -ra -m llamacpp tests/test_export_gguf.py tests/test_export_ollama.py "$@"
