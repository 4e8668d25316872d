#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite; extra args go to pytest
# (e.g. `bash scripts/test.sh -m "not slow and not integration"` for the fast suite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check platform tests bench
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest "$@"
