"""``leadstage demo`` as an operator runs it: a real process, on the test Redis or on a redis-server of its own."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from worker.core.processes import free_port
from worker.devtools.demo import DEMO_DLQ, DEMO_RESULTS

DEMO = (sys.executable, "-m", "worker.cli", "demo")
#: The demo bounds itself to 30 s; this only stops a hung test.
TIMEOUT_S = 40


@dataclass(frozen=True)
class Run:
    status: int
    stdout: str
    stderr: str
    seconds: float


async def run_demo(**env: str) -> Run:
    """``leadstage demo`` with a clean environment (no IVVY_*/LEADSTAGE_* of the developer's) plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("IVVY_", "LEADSTAGE_", "REDIS_URL"))}
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *DEMO,
        env={**base, "PYTHONIOENCODING": "utf-8", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT_S)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode(), time.monotonic() - started)


def lines_of(run: Run, kind: str) -> list[str]:
    """The lines about one change each, of one kind (succeeded, retrying...): a mark, then the kind."""
    return [line for line in run.stdout.splitlines() if re.match(rf"  [^\w\s] {kind} ", line)]


async def test_the_demo_shows_every_outcome_and_leaves_production_keys_alone(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    production = {"leadstage:queue": "job", "leadstage:ledger:default:crm-42": "entry", "leadstage:results": "x"}
    for key, value in production.items():
        await redis_client.set(key, value)
    metrics_port = free_port()

    run = await run_demo(REDIS_URL=redis_url, LEADSTAGE_METRICS_PORT=str(metrics_port))

    assert run.status == 0, run.stdout + run.stderr
    assert run.seconds < 30
    assert run.stderr == ""  # worker logs stay below WARNING
    assert f"metrics  http://127.0.0.1:{metrics_port}/metrics" in run.stdout
    assert len(lines_of(run, "succeeded")) == 4
    [failed] = lines_of(run, "failed")
    assert "24321" in failed
    assert "(dead-lettered)" in failed
    assert lines_of(run, "retrying")
    assert "name: must not be empty" in run.stdout  # the producer's InvalidChange, naming the field
    assert len(lines_of(run, "refused")) == 1
    assert len(lines_of(run, "duplicate")) == 1
    assert 'leadstage_changes_total{account="leadstage-demo",outcome="succeeded"} 4.0' in run.stdout
    assert "Every sample ended as expected" in run.stdout
    assert "\x1b[" not in run.stdout  # no colour into a pipe

    [dead] = await redis_client.xrange(DEMO_DLQ)
    assert dead[1][b"idempotency_key"].endswith(b"-quoted")
    assert await redis_client.xlen(DEMO_RESULTS) >= 7
    for key, value in production.items():
        assert await redis_client.get(key) == value.encode()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH")
async def test_the_demo_runs_its_own_redis_when_nothing_answers() -> None:
    run = await run_demo(REDIS_URL="redis://127.0.0.1:1/0", LEADSTAGE_METRICS_PORT="0")

    assert run.status == 0, run.stdout + run.stderr
    match = re.search(
        r"nothing answers at redis://127.0.0.1:1/0: started redis-server on redis://127.0.0.1:(\d+)/0", run.stdout
    )
    assert match, run.stdout
    assert "Every sample ended as expected" in run.stdout
    with pytest.raises(ConnectionRefusedError):  # and it stopped it
        socket.create_connection(("127.0.0.1", int(match[1])), timeout=1).close()


async def test_without_redis_or_redis_server_the_demo_says_so_in_one_line() -> None:
    run = await run_demo(REDIS_URL="redis://127.0.0.1:1/0", PATH=os.path.dirname(sys.executable))

    assert run.status == 1
    assert run.stdout == ""
    [line] = run.stderr.splitlines()
    assert "nothing answers at redis://127.0.0.1:1/0" in line
    assert "redis-server is not on PATH" in line
