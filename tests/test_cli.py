"""Every ``leadstage`` command through a real subprocess, against the test Redis.

Results and dead letters come from the real path: ``leadstage worker`` applying changes to
``leadstage fake-ivvy``, which refuses updates of its built-in stages (24321: not editable).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from standardwebhooks.webhooks import Webhook

from worker.settings import DEMO_API_KEY, DEMO_API_SECRET

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"leadstage cli test secret").decode()
#: Variables of the developer's shell that would change what the commands do.
_OWN_VARIABLES = ("REDIS_URL", "WEBHOOK_SECRET", "LEADSTAGE_ACCOUNTS_FILE")

Run = Callable[..., subprocess.CompletedProcess[str]]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli", *args]


@pytest.fixture
def env(redis_url: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in _OWN_VARIABLES and not k.startswith("IVVY_")}
    return {**base, "REDIS_URL": redis_url, "LEADSTAGE_LOG_FORMAT": "json", "LEADSTAGE_METRICS_PORT": "0"}


@pytest.fixture
def db(redis_url: str) -> Iterator[redis.Redis]:
    """The test database, emptied before and after the test (the commands are other processes)."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


def queued(db: redis.Redis) -> int:
    count = db.zcard("leadstage:queue")
    assert isinstance(count, int)
    return count


@pytest.fixture
def leadstage(env: dict[str, str], db: redis.Redis) -> Run:
    """Run one command to its end (on a flushed test database)."""

    def run(
        *args: str, stdin: str | None = None, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - our own command, fixed arguments
            command(*args),
            input=stdin,
            capture_output=True,
            text=True,
            env={**env, **(extra_env or {})},
            cwd=ROOT,
            timeout=60,
        )

    return run


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("leadstage: error: "), result.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@contextlib.contextmanager
def background(*args: str, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """A long-running command; SIGTERM at the end, which it must answer with exit status 0."""
    process = subprocess.Popen(  # noqa: S603 - our own command, fixed arguments
        command(*args), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
        assert status == 0, process.stderr.read() if process.stderr else status


# -- help, settings, errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["worker"],
        ["enqueue"],
        ["results"],
        ["status"],
        ["dlq"],
        ["dlq", "list"],
        ["dlq", "replay"],
        ["stats"],
        ["webhook"],
        ["fake-ivvy"],
        ["demo"],
    ],
)
def test_every_command_has_help(leadstage: Run, args: list[str]) -> None:
    result = leadstage(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: leadstage")
    assert len(result.stdout.splitlines()) > 5


def test_no_command_and_bad_flags_are_usage_errors(leadstage: Run) -> None:
    assert leadstage().returncode == 2
    result = leadstage("enqueue", "--id", "seven")
    assert result.returncode == 2
    assert "--id: must be a positive whole number in plain digits such as 1001, not 'seven'" in result.stderr


def test_a_bad_setting_stops_the_command_with_one_line_naming_it(leadstage: Run) -> None:
    result = leadstage("stats", extra_env={"REDIS_URL": "http://localhost:6379"})
    assert result.returncode == 2
    assert "REDIS_URL" in one_error_line(result)
    result = leadstage("stats", extra_env={"LEADSTAGE_MAX_ATTEMPTS": "many"})
    assert result.returncode == 2
    assert "LEADSTAGE_MAX_ATTEMPTS" in one_error_line(result)


def test_redis_down_is_one_line_and_status_1_without_the_password(leadstage: Run) -> None:
    result = leadstage("stats", extra_env={"REDIS_URL": "redis://user:hunter2@127.0.0.1:1/0"})
    assert result.returncode == 1
    line = one_error_line(result)
    assert "Redis is unavailable" in line
    assert "127.0.0.1:1" in line
    assert "hunter2" not in result.stderr


def test_the_worker_needs_ivvy_settings(leadstage: Run) -> None:
    result = leadstage("worker")
    assert result.returncode == 2
    assert "IVVY_BASE_URL" in one_error_line(result)


# -- enqueue -------------------------------------------------------------------------------------


def test_enqueue_prints_one_receipt_line(leadstage: Run, db: redis.Redis) -> None:
    add = leadstage("enqueue", "--name", "Hot", "--apply-to", "lead", "--colour", "#AA0000", "--key", "k1")
    assert add.returncode == 0, add.stderr
    assert json_lines(add.stdout) == [{"job_id": "default:k1", "idempotency_key": "k1", "status": "queued"}]
    assert add.stderr == ""

    again = leadstage("enqueue", "--apply-to", "2", "--name", "Hot", "--color", "#aa0000", "--key", "k1")
    assert json_lines(again.stdout)[0]["status"] == "duplicate"

    update = leadstage("enqueue", "--id", "1001", "--colour", "#00ff00", "--account", "eu", "--source", "ops")
    assert update.returncode == 0, update.stderr
    (receipt,) = json_lines(update.stdout)
    assert receipt["status"] == "queued"
    assert receipt["job_id"] == "eu:" + receipt["idempotency_key"]
    assert queued(db) == 2


def test_enqueue_conflict_and_bad_input_are_status_2(leadstage: Run, db: redis.Redis) -> None:
    assert leadstage("enqueue", "--name", "Hot", "--apply-to", "lead", "--key", "k1").returncode == 0
    conflict = leadstage("enqueue", "--name", "Cold", "--apply-to", "lead", "--key", "k1")
    assert conflict.returncode == 2
    assert conflict.stdout == ""
    assert "already used for a different change" in one_error_line(conflict)

    bad = leadstage("enqueue", "--apply-to", "lead")
    assert bad.returncode == 2
    assert one_error_line(bad) == "leadstage: error: invalid change: --name: is required when --id is absent (an add)"

    bad = leadstage("enqueue", "--id", "0", "--colour", "red", "--account", "a b")
    line = one_error_line(bad)
    assert all(field in line for field in ("--id:", "--colour:", "--account:"))
    assert queued(db) == 1


def write_lines(path: Path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


GOOD = '{"name": "A", "applyTo": 1}'


def test_bulk_with_a_bad_line_enqueues_nothing(leadstage: Run, db: redis.Redis, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "f.jsonl", GOOD, "", '{"id": 7}', "not json", '{"name": "B", "applyTo": 2}')
    result = leadstage("enqueue", "--file", path)
    assert result.returncode == 2
    assert result.stdout == ""
    stderr = result.stderr.splitlines()
    assert stderr[0].startswith("line 3: change: an update")
    assert stderr[1].startswith("line 4: not valid JSON")
    assert stderr[-1].startswith("leadstage: error: 2 invalid line(s) (3, 4); nothing enqueued")
    assert queued(db) == 0

    skipped = leadstage("enqueue", "--file", path, "--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr
    assert [r["line"] for r in json_lines(skipped.stdout)] == [1, 5]
    assert "2 queued, 0 duplicate, 2 invalid line(s) skipped" in skipped.stderr.splitlines()[-1]
    assert queued(db) == 2

    missing = leadstage("enqueue", "--file", str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 2
    assert "cannot read" in one_error_line(missing)


def test_bulk_from_stdin_with_per_line_envelopes(leadstage: Run, db: redis.Redis) -> None:
    lines = [
        '{"name": "A", "applyTo": "lead", "idempotency_key": "a", "account": "eu", "source": "import"}',
        '{"id": 1001, "name": "B"}',
        '{"id": 1002, "colour": "#123456", "idempotency_key": "c"}',
    ]
    result = leadstage("enqueue", "--file", "-", "--key", "batch7", stdin="\n".join(lines))
    assert result.returncode == 0, result.stderr
    receipts = json_lines(result.stdout)
    assert [r["job_id"] for r in receipts] == ["eu:a", "default:batch7:2", "default:c"]
    assert "enqueued 3 change(s): 3 queued, 0 duplicate" in result.stderr
    # The same file again, with --key: every line is a duplicate.
    again = leadstage("enqueue", "--file", "-", "--key", "batch7", stdin="\n".join(lines))
    assert [r["status"] for r in json_lines(again.stdout)] == ["duplicate"] * 3
    # A line reusing a key for another change: refused, naming the line, nothing enqueued.
    conflict = leadstage(
        "enqueue", "--file", "-", stdin=GOOD + '\n{"name": "Other", "applyTo": 1, "idempotency_key": "c"}'
    )
    assert conflict.returncode == 2
    assert one_error_line(conflict).startswith("leadstage: error: line 2: idempotency key 'c'")
    assert queued(db) == 3


# -- the real path: fake iVvy + worker -----------------------------------------------------------


@pytest.fixture
def worker_env(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A fake iVvy running, and the environment of a worker that uses it."""
    port = free_port()
    with background("fake-ivvy", "--port", str(port), env=env):
        wait_for(lambda: http("GET", f"http://127.0.0.1:{port}/_admin/stages") == 200, "the fake iVvy")
        yield {
            **env,
            "IVVY_BASE_URL": f"http://127.0.0.1:{port}",
            "IVVY_API_KEY": DEMO_API_KEY,
            "IVVY_API_SECRET": DEMO_API_SECRET,
        }


def read_line(process: subprocess.Popen[str], timeout: float = 20.0) -> dict[str, Any]:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "no output in time"
    result: dict[str, Any] = json.loads(process.stdout.readline())
    return result


def test_results_status_dlq_and_stats_from_a_real_worker(
    leadstage: Run, worker_env: dict[str, str], db: redis.Redis
) -> None:
    def results(*args: str) -> list[dict[str, Any]]:
        result = leadstage("results", *args)
        assert result.returncode == 0, result.stderr
        return json_lines(result.stdout)

    with (
        background("results", "--follow", "--key", "add1", env=worker_env) as follower,
        background("worker", env=worker_env),
    ):
        assert leadstage("enqueue", "--name", "Fresh", "--apply-to", "lead", "--key", "add1").returncode == 0
        assert leadstage("enqueue", "--id", "1", "--name", "Renamed", "--key", "builtin").returncode == 0
        followed = read_line(follower)
        assert (followed["idempotency_key"], followed["event"]) == ("add1", "succeeded")
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=10) == 0
        wait_for(lambda: len(results()) == 2, "two results")

        everything = {entry["idempotency_key"]: entry for entry in results()}
        assert everything["add1"]["stage_id"].isdigit()
        assert (everything["builtin"]["event"], everything["builtin"]["error_code"]) == ("failed", "24321")
        assert [e["idempotency_key"] for e in results("--key", "builtin")] == ["builtin"]

        status = leadstage("status", "builtin")
        assert status.returncode == 0
        standing = json.loads(status.stdout)
        assert (standing["state"], standing["attempts"], standing["stage_id"]) == ("failed", 1, None)
        assert standing["history"][0]["error_code"] == "24321"
        assert json.loads(leadstage("status", "add1").stdout)["state"] == "succeeded"
        unknown = leadstage("status", "nope")
        assert unknown.returncode == 1
        assert "no change with idempotency key 'nope'" in one_error_line(unknown)

        (dead,) = json_lines(leadstage("dlq", "list").stdout)
        assert dead["idempotency_key"] == "builtin"
        assert json.loads(dead["original_change"]) == {"id": 1, "name": "Renamed"}

        stats = json.loads(leadstage("stats").stdout)
        assert stats["dead_letters"] == 1
        assert stats["recent"]["1m"]["succeeded"] == 1
        assert stats["recent"]["1m"]["failed"] == 1

        replayed = leadstage("dlq", "replay", "builtin")
        assert replayed.returncode == 0, replayed.stderr
        assert json_lines(replayed.stdout)[0]["status"] == "queued"
        assert json_lines(replayed.stdout)[0]["generation"] == 1
        # The worker tries again, iVvy refuses again: a new dead letter, of the next generation.
        wait_for(lambda: len(json_lines(leadstage("dlq", "list").stdout)) == 1, "the replay's dead letter")
        assert json_lines(leadstage("dlq", "list").stdout)[0]["generation"] == "1"

        replay_all = leadstage("dlq", "replay", "--all")
        assert replay_all.returncode == 0, replay_all.stderr
        assert [(o["idempotency_key"], o["generation"]) for o in json_lines(replay_all.stdout)] == [("builtin", 2)]

        missing = leadstage("dlq", "replay", "add1", "nope")
        assert missing.returncode == 1
        assert "no dead letter for idempotency key(s) 'add1', 'nope'" in one_error_line(missing)
        assert leadstage("dlq", "replay").returncode == 2


def test_results_follow_ends_cleanly_on_sigterm(env: dict[str, str], db: redis.Redis) -> None:
    with background("results", "--follow", env=env) as follower:
        time.sleep(0.5)
    assert follower.returncode == 0


# -- services ------------------------------------------------------------------------------------


def test_the_webhook_starts_answers_and_stops(leadstage: Run, env: dict[str, str]) -> None:
    refused = leadstage("webhook", "--port", str(free_port()))
    assert refused.returncode == 2
    assert "WEBHOOK_SECRET" in one_error_line(refused)

    port = free_port()
    with background(
        "webhook", "--host", "127.0.0.1", "--port", str(port), env={**env, "WEBHOOK_SECRET": WEBHOOK_SECRET}
    ):
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http("GET", base + "/healthz") == 200, "the webhook")
        assert http("GET", base + "/readyz") == 200
        body = b'{"name": "Hot", "applyTo": "lead"}'
        now = datetime.now(UTC)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": "msg_cli",
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(WEBHOOK_SECRET).sign("msg_cli", now, body.decode()),
        }
        assert http("POST", base + "/v1/lead-stage-changes", body, headers) == 202
        assert http("POST", base + "/v1/lead-stage-changes", body, {**headers, "webhook-id": "other"}) == 401
    assert json.loads(leadstage("status", "msg_cli").stdout)["source"] == "webhook:msg_cli"


def test_fake_ivvy_starts_answers_and_stops(env: dict[str, str]) -> None:
    port = free_port()
    with background("fake-ivvy", "--port", str(port), env=env):
        wait_for(lambda: http("GET", f"http://127.0.0.1:{port}/_admin/stages") == 200, "the fake iVvy")
        assert http("POST", f"http://127.0.0.1:{port}/api/1.0/test?action=ping") == 401  # unsigned
