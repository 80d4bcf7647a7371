# Sourced by scripts/test.sh and scripts/demo.sh: a virtualenv with the project installed from the
# lock file (requirements/dev.txt: every version pinned, every file checked against its hash;
# refreshed by scripts/lock.sh), a Redis answering on 127.0.0.1:6379 (started here when none
# answers), and Debian's chromium for the console's browser tests (Playwright drives it; its own
# browser download is not used). Re-installs by itself when the lock file or pyproject.toml changes.
_lock_stamp="$(cat requirements/dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.installed 2>/dev/null)" != "$_lock_stamp" ] \
    || ! .venv/bin/python -c "import worker, producers, pytest" 2>/dev/null; then
    python3 -m venv .venv
    # Exactly the locked set: --require-hashes refuses any file whose hash is not in the lock.
    .venv/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements/dev.txt
    # The project itself, editable, built with the locked setuptools (no download at build time).
    .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
    echo "$_lock_stamp" > .venv/.installed
fi
unset _lock_stamp
# Bytecode for the project, as a wheel install would have it: an editable install has none, and a
# machine with PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module at every start.
.venv/bin/python -m compileall -q -j 0 worker producers >/dev/null
if ! .venv/bin/python -c "import socket; socket.create_connection(('127.0.0.1', 6379), 1).close()" 2>/dev/null; then
    if ! command -v redis-server >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
        else
            echo "redis-server is not installed and nothing answers on 127.0.0.1:6379" >&2; exit 1
        fi
    fi
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no
    for _ in $(seq 50); do
        .venv/bin/python -c "import socket; socket.create_connection(('127.0.0.1', 6379), 1).close()" 2>/dev/null && break
        sleep 0.1
    done
fi
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "warning: /usr/bin/chromium is missing: the console's browser tests will fail (apt-get install chromium as root)" >&2
    fi
fi
