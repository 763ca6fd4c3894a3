#!/usr/bin/env bash
# Install esm-index and its dependencies into ./.venv (CPU torch first: an unpinned torch
# would pull a multi-GB CUDA build). Usage: bash tools/install.sh [extras, e.g. test]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
echo "installed: .venv/bin/esm-index ('source .venv/bin/activate' puts esm-index on PATH; 'python -m esm_index' works too)"
