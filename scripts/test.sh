#!/usr/bin/env bash
# The README's test command: a virtual environment, the pinned packages, lint, then the whole suite on CPU.
# Needs python3 >= 3.11 (pyproject's requires-python; pip refuses the package on an older one).
# The one real-browser test drives Debian's chromium (Playwright without its own browser download).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
  as_root=""
  [ "$(id -u)" = 0 ] || as_root="sudo -n"  # sudo only without a password prompt: the command must not wait
  if command -v apt-get >/dev/null && { [ -z "$as_root" ] || sudo -n true 2>/dev/null; }; then
    $as_root apt-get update -qq && $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: the browser tests need chromium and will fail without it: install it first" \
      "(Debian: sudo apt-get install -y chromium; Ubuntu: sudo snap install chromium)" >&2
  fi
fi
python3 -m venv .venv
.venv/bin/pip install -q -r requirements-dev.txt -c constraints.txt  # the package (editable), exact pins
.venv/bin/ruff check .
# Two workers, one torch thread each (tests/conftest.py): both cores busy, and a test file's fixtures built once.
.venv/bin/python -m pytest -n 2 --dist loadfile "$@"
