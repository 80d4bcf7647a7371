# Sourced by scripts/test.sh and scripts/demo.sh: a virtualenv with the project installed,
# and a Redis answering on 127.0.0.1:6379 (started here when none answers).
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import worker, producers, pytest, opentelemetry.sdk" 2>/dev/null \
    || [ pyproject.toml -nt .venv/.installed ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[test,otel]"
    touch .venv/.installed
fi
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
