#!/usr/bin/env bash
# Set everything up, then lint (ruff, import-linter) and run the whole test suite (this is what .ci/run runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports --no-logo  # the layers contract of pyproject.toml: no upward import, no cycle
.venv/bin/python -m pytest -q "$@"
