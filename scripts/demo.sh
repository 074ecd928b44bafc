#!/usr/bin/env bash
# Set up the project environment (if needed) and run the SafetyDPO demo on the built-in demo world.
# Extra arguments go to trainer/demo.py (see `--help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" trainer/demo.py "$@"
