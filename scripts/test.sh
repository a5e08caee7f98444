#!/usr/bin/env bash
# The README's test command: a virtual environment, the pinned packages, lint, then the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -r requirements-dev.txt
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
