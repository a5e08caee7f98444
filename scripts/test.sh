#!/usr/bin/env bash
# The README's test command: a virtual environment, the pinned packages, lint, then the whole suite on CPU.
# Needs python3 >= 3.11 (pyproject's requires-python; pip refuses the package on an older one).
# The one real-browser test drives Debian's chromium (Playwright without its own browser download).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: the browser test needs chromium: sudo apt-get install -y chromium" >&2
  fi
fi
python3 -m venv .venv
.venv/bin/pip install -q -r requirements-dev.txt -c constraints.txt  # the package (editable), exact pins
.venv/bin/ruff check .
# Two workers, one torch thread each (tests/conftest.py): both cores busy, and a test file's fixtures built once.
.venv/bin/python -m pytest -n 2 --dist loadfile "$@"
