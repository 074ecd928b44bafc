#!/usr/bin/env bash
# Create (or reuse) the project virtual environment in .venv and install everything the demo and
# the tests need. Safe to run again: a finished environment is marked and reused; an unfinished one
# is rebuilt, never trusted.
#
#   bash scripts/setup_env.sh            # uses $PYTHON, else python3.11, else python3
#
# PyTorch: when the environment has no torch, `torch==2.13.0` is installed first (on these machines
# that is a local CPU build; asking for plain `torch` would pull several GB of CUDA packages), and the
# rest is installed with a constraints file pinning whatever torch is installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
MARKER="$VENV/.safetydpo-ready"
say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3.13 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
[ -n "$PY" ] || die "no Python found. Install Python 3.10-3.13 (3.11 is what we test) or set PYTHON=/path/to/python."
"$PY" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 13) else 1)' \
  || die "$("$PY" --version 2>&1) is not supported: use Python 3.10-3.13 (3.11 is what we test), e.g. PYTHON=python3.11 bash scripts/setup_env.sh"

# Requirements fingerprint: a change to the requirement files rebuilds the install step.
FINGERPRINT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha256sum | cut -c1-16)"
if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$FINGERPRINT" ] && "$VENV/bin/python" -c 'import torch, diffusers, peft, safetensors, pytest' 2>/dev/null; then
  say "reusing $VENV"
  exit 0
fi

FREE_KB="$(df -Pk "$ROOT" | awk 'NR==2 {print $4}')"
[ "${FREE_KB:-0}" -ge 3000000 ] || die "less than 3 GB free on $(df -Pk "$ROOT" | awk 'NR==2 {print $6}'): free some disk space and run again."

rm -f "$MARKER"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  say "creating $VENV with $("$PY" --version 2>&1)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" || die "could not create a virtual environment (on Debian/Ubuntu: apt-get install python3-venv)."
fi
VPY="$VENV/bin/python"
# pip byte-compiles what it installs (keep it: with PYTHONDONTWRITEBYTECODE set, as on these machines, a --no-compile
# install made every new process compile torch, diffusers and transformers again: imports 25 s instead of 15 s).
pipq() { "$VPY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v -E '^WARNING: Location|is ignored: it is neither' || true; }

if ! "$VPY" -c 'import torch' 2>/dev/null; then
  say "installing torch==2.13.0"
  pipq torch==2.13.0
  "$VPY" -c 'import torch' 2>/dev/null || die "torch could not be installed. Install a PyTorch build for your machine into $VENV (e.g. $VPY -m pip install torch==2.13.0) and run again."
fi
CONSTRAINTS="$(mktemp)"; trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$("$VPY" -c 'import torch; print(torch.__version__.split("+")[0])')" > "$CONSTRAINTS"
say "installing requirements (torch pinned to $(cat "$CONSTRAINTS"))"
pipq -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" -c "$CONSTRAINTS"
"$VPY" -c 'import torch, diffusers, peft, safetensors, transformers, accelerate, yaml, PIL, matplotlib, pytest' \
  || die "some packages did not install (see the pip messages above); fix that and run again."
echo "$FINGERPRINT" > "$MARKER"
say "ready: $VENV"
