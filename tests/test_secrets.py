"""Secrets never appear in a log line, a stream entry, a ledger hash, an error message or metrics.

One full scenario with distinctive secrets, every process real (``python -m worker.cli ...``, so
all of its stdout and stderr is captured): the fake iVvy configured with the API key and secret,
a worker, the webhook, and the command line. Signed webhooks (valid and invalid), CLI enqueues
(valid and invalid), failures of every kind (24321 not editable, 401 from iVvy for an account with
a wrong secret, bad settings, Redis unreachable behind a password), replays. Then every text the
product produced is searched for every secret: the raw value and, for the webhook secret, the
base64 after ``whsec_`` (with and without padding) and the key it decodes to.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from producers.openapi import CHANGES_PATH
from tests.harness import start_worker_process, stop_process, wait_for_terminal
from tests.test_hostile_input import signed
from worker.core.processes import free_port, python_module, wait_for_port

API_KEY = "live-key"
API_SECRET = "s3cr3t-API-9f8e7d"
#: The configured secret of account "wrong", which the fake does not accept: every call is a 401.
WRONG_ACCOUNT_SECRET = "wr0ng-s3cr3t-API-5a4b3c"
WEBHOOK_KEY = b"distinctive-webhook-key-4f1c9a77e2"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(WEBHOOK_KEY).decode()
REDIS_PASSWORD = "r3dis-pa55-c0ffee"
#: A WEBHOOK_SECRET that is not base64 (13 characters): refused at start, without repeating it.
BROKEN_WEBHOOK_SECRET = "whsec_Br0kenS3cretX"

#: Every text that must not appear anywhere, by name.
FORBIDDEN = {
    "IVVY_API_SECRET": API_SECRET,
    "wrong account's api_secret": WRONG_ACCOUNT_SECRET,
    "WEBHOOK_SECRET": WEBHOOK_SECRET,
    "WEBHOOK_SECRET after whsec_": WEBHOOK_SECRET.removeprefix("whsec_"),
    "WEBHOOK_SECRET after whsec_, unpadded": WEBHOOK_SECRET.removeprefix("whsec_").rstrip("="),
    "the webhook key": WEBHOOK_KEY.decode(),
    "the Redis password": REDIS_PASSWORD,
    "the broken WEBHOOK_SECRET": BROKEN_WEBHOOK_SECRET,
    "the broken WEBHOOK_SECRET after whsec_": BROKEN_WEBHOOK_SECRET.removeprefix("whsec_"),
}


@dataclass
class Scenario:
    """The running processes and every text collected from them, by where it came from."""

    tmp: Path
    env: dict[str, str]
    fake_url: str
    webhook_url: str
    metrics_port: int
    texts: dict[str, str] = field(default_factory=dict)

    def keep(self, where: str, text: str | bytes) -> None:
        self.texts[where] = text.decode(errors="replace") if isinstance(text, bytes) else text

    async def cli(self, where: str, *args: str, env: Mapping[str, str] | None = None, stdin: bytes = b"") -> int:
        """``leadstage ARGS``; its stdout and stderr are kept under ``where``; returns the exit status."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker.cli",
            *args,
            env=dict(env or self.env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(stdin), 60)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"leadstage {' '.join(args)} did not end within 60 s") from None
        self.keep(f"cli {where} (stdout)", out)
        self.keep(f"cli {where} (stderr)", err)
        assert process.returncode is not None
        return process.returncode


def _environment(redis_url: str, fake_url: str, accounts_file: Path, metrics_port: int) -> dict[str, str]:
    """What a deployment would set: every secret present, every log line JSON, at debug level."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("IVVY_", "LEADSTAGE_", "WEBHOOK_", "REDIS_"))}
    return clean | {
        "REDIS_URL": redis_url,
        "IVVY_BASE_URL": fake_url,
        "IVVY_API_KEY": API_KEY,
        "IVVY_API_SECRET": API_SECRET,
        "LEADSTAGE_ACCOUNTS_FILE": str(accounts_file),
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "LEADSTAGE_RATE_LIMIT": "1000",
        "LEADSTAGE_MAX_ATTEMPTS": "2",
        "LEADSTAGE_BACKOFF_BASE": "0.05",
        "LEADSTAGE_REQUEST_TIMEOUT": "2",
        "LEADSTAGE_LEASE": "2",
        "LEADSTAGE_METRICS_PORT": str(metrics_port),
        "LEADSTAGE_LOG_FORMAT": "json",
        "LEADSTAGE_LOG_LEVEL": "debug",
    }


@pytest.fixture
def processes(redis_url: str, tmp_path: Path) -> Iterator[tuple[Scenario, list[subprocess.Popen[bytes]]]]:
    """The fake iVvy, a worker and the webhook, as processes; stopped (SIGTERM) at the end."""
    fake_port, webhook_port, metrics_port = free_port(), free_port(), free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    accounts = tmp_path / "accounts.json"
    accounts.write_bytes(
        orjson.dumps({"wrong": {"base_url": fake_url, "api_key": API_KEY, "api_secret": WRONG_ACCOUNT_SECRET}})
    )
    env = _environment(redis_url, fake_url, accounts, metrics_port)
    scenario = Scenario(tmp_path, env, fake_url, f"http://127.0.0.1:{webhook_port}", metrics_port)
    started: list[subprocess.Popen[bytes]] = []
    try:
        for name, args in (
            ("fake-ivvy", ["fake-ivvy", "--port", str(fake_port), "--log-requests"]),
            ("webhook", ["webhook", "--host", "127.0.0.1", "--port", str(webhook_port)]),
        ):
            with (tmp_path / f"{name}.log").open("wb") as log:
                started.append(
                    subprocess.Popen(  # noqa: S603 - our interpreter, fixed arguments
                        python_module("worker.cli", *args), env=env, stdout=log, stderr=subprocess.STDOUT
                    )
                )
        started.append(start_worker_process(env, tmp_path / "worker.log"))
        for process, port in zip(started, (fake_port, webhook_port, metrics_port), strict=True):
            wait_for_port(port, 30, process)
        yield scenario, started
    finally:
        for process in started:
            if process.poll() is None:
                stop_process(process, signal.SIGTERM, timeout=30)


async def _webhooks(scenario: Scenario, http: aiohttp.ClientSession) -> list[str]:
    """Signed deliveries, valid and invalid; returns the keys that must reach a terminal event."""

    async def deliver(where: str, change: object, expected: int) -> None:
        body = orjson.dumps(change)
        msg_id = f"wh-{where.replace(' ', '-')}"
        async with http.post(
            scenario.webhook_url + CHANGES_PATH,
            data=body,
            headers=signed(body, secret=WEBHOOK_SECRET, msg_id=msg_id),
        ) as response:
            scenario.keep(f"webhook answer {where}", await response.read())
            assert response.status == expected, where

    async def forged(where: str, body: bytes, headers: dict[str, str]) -> None:
        async with http.post(scenario.webhook_url + CHANGES_PATH, data=body, headers=headers) as response:
            scenario.keep(f"webhook answer {where}", await response.read())
            assert response.status == 401, where

    await deliver("add", {"name": "Webhook add", "applyTo": "lead"}, 202)
    await deliver("not editable", {"id": 2, "name": "Won again"}, 202)
    await deliver("wrong account", {"name": "Wrong account", "applyTo": 1, "account": "wrong"}, 202)
    await deliver("invalid change", {"name": "", "applyTo": 7, "colour": "blue"}, 400)
    body = orjson.dumps({"name": "Forged", "applyTo": 1})
    await forged("wrong secret", body, signed(body, secret="whsec_" + base64.b64encode(b"a guess").decode()))
    await forged("stale", body, signed(body, secret=WEBHOOK_SECRET, at=datetime.now(UTC) - timedelta(hours=1)))
    await forged(
        "garbled", body, signed(body, secret=WEBHOOK_SECRET) | {"webhook-signature": "v1,bm90IGEgc2lnbmF0dXJl"}
    )
    return ["wh-add", "wh-not-editable", "wh-wrong-account"]


async def _command_line(scenario: Scenario) -> list[str]:
    """CLI enqueues, valid and invalid, and configuration errors; returns the keys enqueued."""
    assert (
        await scenario.cli("enqueue ok", "enqueue", "--name", "CLI add", "--apply-to", "lead", "--key", "cli-ok") == 0
    )
    assert (
        await scenario.cli("enqueue 24321", "enqueue", "--id", "1", "--colour", "#123456", "--key", "cli-locked") == 0
    )
    wrong = ("enqueue", "--name", "Via CLI", "--apply-to", "2", "--account", "wrong", "--key", "cli-wrong-account")
    assert await scenario.cli("enqueue wrong account", *wrong) == 0
    assert await scenario.cli("enqueue invalid", "enqueue", "--name", "x", "--apply-to", "banana") == 2
    assert (
        await scenario.cli("enqueue unknown account", "enqueue", "--name", "x", "--apply-to", "1", "--account", "nope")
        == 2
    )
    lines = b'{"name": "ok", "applyTo": 1}\n{"name": 5}\nnot json\n'
    assert await scenario.cli("enqueue file", "enqueue", "--file", "-", stdin=lines) == 2

    # Configuration errors: each names the setting, never its value.
    broken_accounts = scenario.tmp / "broken-accounts.json"
    broken_accounts.write_text('{"x": {"api_secret": "' + WRONG_ACCOUNT_SECRET + '" oops}}')
    assert (
        await scenario.cli(
            "worker, broken accounts file",
            "worker",
            env=scenario.env | {"LEADSTAGE_ACCOUNTS_FILE": str(broken_accounts)},
        )
        == 2
    )
    assert (
        await scenario.cli(
            "webhook, broken secret",
            "webhook",
            "--port",
            "0",
            env=scenario.env | {"WEBHOOK_SECRET": BROKEN_WEBHOOK_SECRET},
        )
        != 0
    )
    behind_password = scenario.env | {"REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0"}
    assert await scenario.cli("stats, Redis unreachable", "stats", env=behind_password) == 1
    return ["cli-ok", "cli-locked", "cli-wrong-account"]


async def _redis_dump(client: aioredis.Redis) -> str:
    """Every key of the database with its whole value, as text."""
    lines = []
    async for raw_key in client.scan_iter("*"):
        kind = (await client.type(raw_key)).decode()
        value: object
        if kind == "hash":
            value = await client.hgetall(raw_key)  # type: ignore[misc]  # redis-py's async stubs
        elif kind == "stream":
            value = await client.xrange(raw_key)
        elif kind == "zset":
            value = await client.zrange(raw_key, 0, -1, withscores=True)
        elif kind == "list":
            value = await client.lrange(raw_key, 0, -1)  # type: ignore[misc]  # redis-py's async stubs
        elif kind == "set":
            value = await client.smembers(raw_key)  # type: ignore[misc]  # redis-py's async stubs
        else:
            value = await client.get(raw_key)
        lines.append(f"{raw_key!r} {kind}: {value!r}")
    return "\n".join(lines)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def test_no_secret_appears_anywhere(
    processes: tuple[Scenario, list[subprocess.Popen[bytes]]], redis_client: aioredis.Redis, http: aiohttp.ClientSession
) -> None:
    scenario, started = processes
    keys = await _webhooks(scenario, http)
    keys += await _command_line(scenario)
    terminal = await wait_for_terminal(redis_client, keys, within_s=60)
    outcomes = {key: events[0]["event"] for key, events in terminal.items()}
    assert outcomes == {
        "wh-add": "succeeded",
        "cli-ok": "succeeded",
        "wh-not-editable": "failed",
        "cli-locked": "failed",
        "wh-wrong-account": "failed",
        "cli-wrong-account": "failed",
    }
    codes = {key: (events[0]["http_status"], events[0]["error_code"]) for key, events in terminal.items()}
    assert codes["cli-locked"] == ("400", "24321")
    assert codes["wh-wrong-account"] == ("401", "unauthorized")

    # Replay a dead letter (it fails again: still the wrong secret), and read everything back.
    assert await scenario.cli("dlq replay", "dlq", "replay", "--account", "wrong", "cli-wrong-account") == 0
    await wait_for_terminal(redis_client, ["cli-wrong-account"], within_s=30)
    for key in keys:
        account = "wrong" if "wrong-account" in key else "default"
        assert await scenario.cli(f"status {key}", "status", "--account", account, key) == 0
    assert await scenario.cli("status unknown", "status", "no-such-key") == 1
    for where, args in {"results": ["results"], "dlq list": ["dlq", "list"], "stats": ["stats"]}.items():
        assert await scenario.cli(where, *args) == 0
    for where, url in {
        "worker /metrics": f"http://127.0.0.1:{scenario.metrics_port}/metrics",
        "webhook /metrics": scenario.webhook_url + "/metrics",
    }.items():
        async with http.get(url) as response:
            scenario.keep(where, await response.read())
    scenario.keep("redis", await _redis_dump(redis_client))

    for process in started:  # SIGTERM: shutdown lines are searched too
        stop_process(process, signal.SIGTERM, timeout=30)
    for name in ("fake-ivvy", "webhook", "worker"):
        scenario.keep(f"{name} log", (scenario.tmp / f"{name}.log").read_bytes())

    # Not vacuous: the texts hold what the scenario did.
    texts = scenario.texts
    assert "24321" in texts["redis"]
    assert "401" in texts["redis"]
    assert "job.finished" in texts["worker log"]
    assert "webhook.request" in texts["webhook log"]
    assert "addOrUpdateLeadStage" in texts["fake-ivvy log"]
    assert "leadstage_changes_total" in texts["worker /metrics"]
    assert "leadstage_webhook_requests_total" in texts["webhook /metrics"]
    assert "WEBHOOK_SECRET" in texts["cli webhook, broken secret (stderr)"]
    assert "LEADSTAGE_ACCOUNTS_FILE" in texts["cli worker, broken accounts file (stderr)"]
    assert "unavailable" in texts["cli stats, Redis unreachable (stderr)"].lower()

    leaks = [
        f"{name} in {where}"
        for where, text in texts.items()
        for name, secret in FORBIDDEN.items()
        if secret.lower() in text.lower()
    ]
    assert leaks == []
