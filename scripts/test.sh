#!/usr/bin/env bash
# Set up the project environment (if needed) and run the test suite.
# Integration tests against the real ComfyUI run when COMFYUI_PATH points at a ComfyUI checkout whose
# requirements are installed in .venv (.ci/run does both); otherwise they skip and say why.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
