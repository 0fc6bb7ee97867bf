#!/usr/bin/env bash
# The minutes-long scenarios (pytest marker `heavy`) that the default test run leaves out: offline:base
# against mlx_whisper in four languages, ten minutes of speech transcribed by windows, a pipeline run that
# fails mid-decode on footage and is retried. Run after scripts/setup.sh; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
exec python -m pytest -q -ra -m heavy "$@"
