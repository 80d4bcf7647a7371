"""``leadstage console`` as a real process: it starts, refuses to without a token, warns beyond
loopback, and keeps its OpenAPI document under schemathesis (never a 5xx, every answer as documented).

The fuzzed requests replay and discard whatever they name: the dead letters are made once, by the
real worker against the fake iVvy, and the fuzzer may use them up; every answer must conform anyway.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
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

#: Seconds the console may take to start (imports, then the listening line).
START_S = 30


def console_env(redis_url: str, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("IVVY_", "LEADSTAGE_", "REDIS_"))}
    return {**base, "REDIS_URL": redis_url, "LEADSTAGE_LOG_FORMAT": "json", **extra}


def start_console(env: dict[str, str], log: Path, *args: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """``leadstage console --port 0 ...``, logging to ``log`` (a pipe nobody reads would fill and
    block it); returns the process and its ``console.listening`` record, once it is written."""
    with log.open("ab") as out:
        process = subprocess.Popen(  # noqa: S603 - our own command, fixed arguments
            [sys.executable, "-m", "worker.cli", "console", "--port", "0", *args],
            env=env, stdout=subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline and process.poll() is None:
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "console.listening":
                return process, record
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the console did not start: {log.read_text()}")


def records(log: Path, event: str) -> list[dict[str, Any]]:
    return [record for record in map(json.loads, log.read_text().splitlines()) if record.get("event") == event]


def stop_console(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=15)


def test_the_console_does_not_start_without_a_token(redis_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "console"], env=console_env(redis_url), capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "LEADSTAGE_CONSOLE_TOKEN is not set" in done.stderr


def test_listening_beyond_loopback_warns(redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    env = console_env(redis_url, LEADSTAGE_CONSOLE_TOKEN=TOKEN)
    process, _ = start_console(env, log, "--host", "0.0.0.0")  # noqa: S104 - the warning is the subject
    [warning] = records(log, "console.exposed")
    assert warning["level"] == "warning"
    assert "LEADSTAGE_CONSOLE_TLS_PROXY" in warning["detail"]
    assert stop_console(process) == 0
    assert TOKEN not in log.read_text()
    proxied = tmp_path / "proxied.log"
    process, _ = start_console({**env, "LEADSTAGE_CONSOLE_TLS_PROXY": "1"}, proxied, "--host", "0.0.0.0")  # noqa: S104 - as above
    assert stop_console(process) == 0
    assert records(proxied, "console.exposed") == []  # a TLS proxy is declared


@pytest.fixture(scope="module")
def console(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The console process over a database holding dead letters, results and a queued change."""
    asyncio.run(_seed(redis_url))
    env = console_env(redis_url, LEADSTAGE_CONSOLE_TOKEN=TOKEN, LEADSTAGE_CONSOLE_READ_TOKEN=READ_TOKEN)
    process, listening = start_console(env, tmp_path_factory.mktemp("console") / "console.log")
    try:
        yield f"http://127.0.0.1:{listening['port']}"
    finally:
        assert stop_console(process) == 0


async def _seed(redis_url: str) -> None:
    import redis.asyncio as aioredis

    from tests.console_support import console_settings, enqueue
    from tests.harness import wait_for_terminal
    from worker.fake_ivvy import running_fake_ivvy
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
