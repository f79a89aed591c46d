#!/usr/bin/env bash
# Install, then run the whole test suite (starts its own redis-server, workers and producer).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
