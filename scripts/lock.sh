#!/usr/bin/env bash
# Refreshes the lock files from pyproject.toml's ranges (and requirements/build.in): the newest
# versions the ranges allow, each pinned with the hashes of its files, for every platform.
#   requirements/dev.txt      setup.sh and CI: the project's dependencies, the test extra, the build tools
#   requirements/runtime.txt  the Docker image: the project's dependencies and the otel extra
#   requirements/build.txt    the image's build stage: the build tools only
# Run it after changing a dependency in pyproject.toml (or to take new releases), then commit the
# three files; scripts/setup.sh re-installs by itself when they change. Extra arguments go to
# uv, e.g. `bash scripts/lock.sh --upgrade-package aiohttp`.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.9.30
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/uv --version 2>/dev/null | grep -qx "uv $UV_VERSION"; then
    .venv/bin/python -m pip install --quiet "uv==$UV_VERSION"
fi
compile() {
    local out="$1"; shift
    .venv/bin/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
        --no-header --output-file "$out" "$@"
}
compile requirements/dev.txt pyproject.toml requirements/build.in --extra test --extra otel "${@}"
compile requirements/runtime.txt pyproject.toml --extra otel "${@}"  # the image can trace (OTEL_*)
compile requirements/build.txt requirements/build.in "${@}"
echo "lock files refreshed: requirements/dev.txt, requirements/runtime.txt, requirements/build.txt"
