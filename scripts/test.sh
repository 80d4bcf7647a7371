#!/usr/bin/env bash
# README's test command: sets up everything it needs on a fresh machine, then runs
# ruff, mypy --strict and pytest against a real Redis and the fake iVvy on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check .
echo "== ruff format --check"; .venv/bin/ruff format --check .
echo "== mypy --strict"; .venv/bin/mypy
echo "== pytest"; .venv/bin/pytest "$@"
