"""``leadstage console`` as a real process: it starts, refuses to without a token, warns beyond
loopback, and keeps its OpenAPI document under schemathesis (never a 5xx, every answer as documented).

The fuzzed requests replay and discard whatever they name: the dead letters are made once, by the
real worker against the fake iVvy, and the fuzzer may use them up; every answer must conform anyway.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.console_support import MISSING_STAGE, READ_TOKEN, TOKEN, bearer
from worker.console.openapi import openapi_document
from worker.core.processes import Child, free_port, python_module, wait_for_port

pytestmark = pytest.mark.system  # starts the console as a process

#: Seconds the console may take to start (imports, then the listening line).
START_S = 30


def console_env(redis_url: str, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("IVVY_", "LEADSTAGE_", "REDIS_"))}
    return {**base, "REDIS_URL": redis_url, "LEADSTAGE_LOG_FORMAT": "json", **extra}


def start_console(env: dict[str, str], log: Path, *args: str) -> tuple[Child, int]:
    """``leadstage console`` on a free port, logging to ``log``, once it accepts connections."""
    port = free_port()
    child = Child("console", python_module("worker.cli", "console", "--port", str(port), *args), env, log).start()
    wait_for_port(port, START_S, child.popen)
    return child, port


def records(log: Path, event: str) -> list[dict[str, Any]]:
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return [record for record in map(json.loads, lines) if record.get("event") == event]


def test_the_console_does_not_start_without_a_token(redis_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "console"], env=console_env(redis_url), capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "LEADSTAGE_CONSOLE_TOKEN is not set" in done.stderr


def test_listening_beyond_loopback_warns(redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    env = console_env(redis_url, LEADSTAGE_CONSOLE_TOKEN=TOKEN)
    console, _ = start_console(env, log, "--host", "0.0.0.0")  # noqa: S104 - the warning is the subject
    [warning] = records(log, "console.exposed")
    assert warning["level"] == "warning"
    assert "LEADSTAGE_CONSOLE_TLS_PROXY" in warning["detail"]
    assert console.stop() == 0
    assert TOKEN not in log.read_text()
    proxied = tmp_path / "proxied.log"
    console, _ = start_console({**env, "LEADSTAGE_CONSOLE_TLS_PROXY": "1"}, proxied, "--host", "0.0.0.0")  # noqa: S104 - as above
    assert console.stop() == 0
    assert records(proxied, "console.exposed") == []  # a TLS proxy is declared


@pytest.fixture(scope="module")
def console(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The console process over a database holding dead letters, results and a queued change."""
    asyncio.run(_seed(redis_url))
    env = console_env(redis_url, LEADSTAGE_CONSOLE_TOKEN=TOKEN, LEADSTAGE_CONSOLE_READ_TOKEN=READ_TOKEN)
    console, port = start_console(env, tmp_path_factory.mktemp("console") / "console.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        assert console.stop() == 0, console.log_tail()


async def _seed(redis_url: str) -> None:
    import redis.asyncio as aioredis

    from tests.console_support import console_settings, enqueue
    from tests.harness import wait_for_terminal
    from worker.devtools.fake_ivvy import running_fake_ivvy
    from worker.runner import running_worker

    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.flushdb()
        async with running_fake_ivvy() as fake:
            settings = console_settings(redis_url, fake.url)
            await enqueue(client, settings, {"id": MISSING_STAGE, "name": "Later"}, "missing")
            await enqueue(client, settings, {"id": 1, "name": "Quoted!"}, "builtin")
            await enqueue(client, settings, {"name": "Fine", "applyTo": "lead"}, "fine")
            async with running_worker(settings):
                await wait_for_terminal(client, ["missing", "builtin", "fine"])
            await enqueue(client, settings, {"name": "Waiting", "applyTo": "lead"}, "waiting", account="other")
    finally:
        await client.aclose()


schema = schemathesis.openapi.from_dict(openapi_document())


@hypothesis.settings(max_examples=25, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@schema.parametrize()
def test_the_console_keeps_its_openapi_document(console: str, case: schemathesis.Case[Any]) -> None:
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        positive_data_acceptance,
    ]
    case.call_and_validate(base_url=console, headers=bearer(), checks=checks)
