#!/usr/bin/env bash
# The main job: install, then run the whole stack on embedded defaults (private Redis, a CPU
# worker, the producer on http://127.0.0.1:8000, demo models) and send a sample job through it.
# Extra arguments go to `banter up` (e.g. --exit-after-sample, --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/banter up --sample "$@"
