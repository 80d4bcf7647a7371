#!/usr/bin/env bash
# README's demo command: sets up everything it needs on a fresh machine (a virtualenv with the
# project, a Redis on 127.0.0.1:6379 when none answers), then runs `leadstage demo`: a fake iVvy,
# a worker and sample changes, results printed. Arguments are passed on (e.g. --keep-running).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/leadstage demo "$@"
