#!/usr/bin/env bash
# The minutes-long scenarios (pytest marker `heavy`) that the default test run leaves out: offline:base
# against mlx_whisper in four languages, ten minutes of speech transcribed by windows, a pipeline run that
# fails mid-decode on footage and is retried, llama.cpp on SmolLM2-135M fused GGUFs in three dtypes
# (test_llama_cpp_on_smollm2_fused; the default run checks the fused path with llama.cpp on a tiny model in
# four dtypes, and SmolLM2's adapter GGUF with llama.cpp). Run after scripts/setup.sh; extra arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
exec python -m pytest -q -ra -m heavy "$@"
