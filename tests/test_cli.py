"""Every ``leadstage`` command through a real subprocess, against the test Redis.

Results and dead letters come from the real path: ``leadstage worker`` applying changes to
``leadstage fake-ivvy``, which refuses updates of its built-in stages (24321: not editable).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import TEST_API_SECRET, TEST_REDIS_PASSWORD
from tests.webhook_signing import signed_headers
from worker.core import keys
from worker.core.processes import free_port, python_module
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"leadstage cli test secret").decode()
#: Variables of the developer's shell that would change what the commands do.
_OWN_VARIABLES = ("REDIS_URL", "WEBHOOK_SECRET", "LEADSTAGE_ACCOUNTS_FILE")

Run = Callable[..., subprocess.CompletedProcess[str]]


def command(*args: str) -> list[str]:
    return python_module("worker.cli", *args)


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
    """Changes in every account's queue."""
    total = 0
    for queue in db.scan_iter(match=keys.queue_key("leadstage:queue", "*")):
        count = db.zcard(queue)
        assert isinstance(count, int)
        total += count
    return total


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
    with process:  # closes its pipes at the end
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
            errors = process.stderr.read() if process.stderr else ""
    assert status == 0, errors


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
    result = leadstage("stats", extra_env={"REDIS_URL": f"redis://user:{TEST_REDIS_PASSWORD}@127.0.0.1:1/0"})
    assert result.returncode == 1
    line = one_error_line(result)
    assert "Redis is unavailable" in line
    assert "127.0.0.1:1" in line
    assert TEST_REDIS_PASSWORD not in result.stderr


#: What ``leadstage worker`` needs besides Redis (an iVvy that is never reached; no metrics port).
WORKER_ENV = {
    "IVVY_BASE_URL": "http://127.0.0.1:1",
    "IVVY_API_KEY": "key",
    "IVVY_API_SECRET": TEST_API_SECRET,
    "LEADSTAGE_METRICS_PORT": "0",
}


def test_a_redis_user_without_the_permissions_needed_is_one_line_and_status_2(
    leadstage: Run, env: dict[str, str]
) -> None:
    admin = redis.Redis.from_url(env["REDIS_URL"])
    user, password = f"leadstage-test-{os.getpid()}", "test-acl-password-5d4c3b2a"
    url = env["REDIS_URL"].replace("redis://", f"redis://{user}:{password}@", 1)
    try:
        # No scripts at all; then scripts, but none of leadstage's keys (the refusal comes from inside one).
        for patterns, commands in ((["*"], ["+@all", "-eval", "-evalsha", "-script"]), (["other:*"], ["+@all"])):
            admin.acl_setuser(
                user, enabled=True, reset=True, passwords=[f"+{password}"], keys=patterns, commands=commands
            )
            for args in (("enqueue", "--name", "Denied", "--apply-to", "1", "--key", "acl-1"), ("stats",), ("worker",)):
                result = leadstage(*args, extra_env={"REDIS_URL": url, **WORKER_ENV})
                if args == ("stats",) and patterns == ["*"]:
                    assert result.returncode == 0, result.stderr  # reads need no script
                    continue
                assert result.returncode == 2, (patterns, commands, args, result.stderr)
                # The worker's JSON log lines share its stderr: the error is its one other line.
                (line,) = [line for line in result.stderr.splitlines() if not line.startswith("{")]
                assert line.startswith("leadstage: error: REDIS_URL: its Redis user is not allowed to do what"), line
                assert password not in result.stderr
    finally:
        admin.acl_deluser(user)
        admin.close()


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
    database = str(db.connection_pool.connection_kwargs["db"])

    def following() -> bool:  # blocked in XREAD: past start-up, its signal handlers are in place
        clients: list[dict[str, str]] = db.client_list()  # type: ignore[assignment]  # redis-py's stubs: sync or async
        return any(c["cmd"] == "xread" and c["db"] == database for c in clients)

    with background("results", "--follow", env=env) as follower:
        wait_for(following, "results --follow to block in XREAD")
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
        headers = signed_headers(body, WEBHOOK_SECRET, msg_id="msg_cli")
        assert http("POST", base + "/v1/lead-stage-changes", body, headers) == 202
        assert http("POST", base + "/v1/lead-stage-changes", body, {**headers, "webhook-id": "other"}) == 401
    assert json.loads(leadstage("status", "msg_cli").stdout)["source"] == "webhook:msg_cli"


def test_fake_ivvy_starts_answers_and_stops(env: dict[str, str]) -> None:
    port = free_port()
    with background("fake-ivvy", "--port", str(port), env=env):
        wait_for(lambda: http("GET", f"http://127.0.0.1:{port}/_admin/stages") == 200, "the fake iVvy")
        assert http("POST", f"http://127.0.0.1:{port}/api/1.0/test?action=ping") == 401  # unsigned


# -- issue 12: hardening of the command line ------------------------------------------------------


def test_a_key_reused_on_line_1001_with_another_change_enqueues_nothing_and_says_where(
    leadstage: Run, db: redis.Redis, tmp_path: Path
) -> None:
    """Item 1: the conflict is in the second chunk, the key's first use in the first one."""
    lines = [json.dumps({"name": f"S{i}", "applyTo": 1, "idempotency_key": f"k{i}"}) for i in range(1, 1001)]
    lines.append(json.dumps({"name": "Other", "applyTo": 2, "idempotency_key": "k1"}))
    result = leadstage("enqueue", "--file", write_lines(tmp_path / "f.jsonl", *lines))
    assert result.returncode == 2
    assert one_error_line(result) == (
        "leadstage: error: line 1001: idempotency key 'k1' of account 'default' comes with a different change "
        "at line 1 too; nothing enqueued"
    )
    assert result.stdout == ""
    assert db.dbsize() == 0  # no job, no ledger entry, no staging hash


def test_flags_that_do_not_go_together_are_refused(leadstage: Run, tmp_path: Path) -> None:
    """Item 13: --file with a change's flags, or --skip-invalid without --file, is an error, not ignored."""
    path = write_lines(tmp_path / "f.jsonl", GOOD)
    for args, flag in [(("--file", path, "--name", "x"), "--name"), (("--file", path, "--id", "5"), "--id")]:
        result = leadstage("enqueue", *args)
        assert result.returncode == 2
        assert f"--file cannot be combined with {flag}" in one_error_line(result)
    result = leadstage("enqueue", "--skip-invalid", "--name", "x", "--apply-to", "1")
    assert result.returncode == 2
    assert "--skip-invalid needs --file" in one_error_line(result)


def test_help_lists_the_environment_and_only_telling_defaults(leadstage: Run) -> None:
    """Item 13: no "(default: None)" noise, no default shown twice, the variables that matter listed."""
    top = leadstage("--help").stdout
    for variable in (
        "REDIS_URL",
        "IVVY_BASE_URL",
        "LEADSTAGE_ACCOUNTS_FILE",
        "WEBHOOK_SECRET",
        "LEADSTAGE_REDIS_TIMEOUT",
    ):
        assert variable in top
    for args in (["enqueue"], ["status"], ["dlq", "replay"], ["webhook"], ["results"]):
        text = leadstage(*args, "--help").stdout
        assert "(default: None)" not in text
        assert "(default: False)" not in text
        # An option whose help states its default gets no second one appended.
        assert not re.search(r"\(default [^()]*\) \(default: ", " ".join(text.split())), text
    enqueue = " ".join(leadstage("enqueue", "--help").stdout.split())
    assert "(default: cli)" in enqueue
    assert "(default: default)" in enqueue


@pytest.mark.parametrize("stage_id", ["5_0", "+5", " 5", "5 ", "\u0665", "\uff15", "05", "0", "-1", "9" * 20])
def test_id_is_plain_digits_as_json_producers_require(leadstage: Run, db: redis.Redis, stage_id: str) -> None:
    """Item 9: int() would take 5_0, +5, ' 5' and non-ASCII digits; the CLI takes what JSON takes."""
    result = leadstage("enqueue", "--id", stage_id, "--name", "x")
    assert result.returncode == 2
    assert "--id: must be" in one_error_line(result)
    assert queued(db) == 0


def test_bad_names_are_refused_with_a_reason_and_escaped_on_the_terminal(leadstage: Run, db: redis.Redis) -> None:
    """Items 8 and 9: no control character reaches the terminal, the reason names the flag."""
    for name, reason in [
        ("a\x1b[2Jb", "--name: must not contain a control character (\\x1b at position 2)"),
        ("a\nb", "--name: must not contain a control character (\\x0a at position 2)"),
        ("abc\u202edcba", "--name: must not contain a bidirectional override (\\u202e at position 4)"),
        ("\u200b\u200b", "--name: must have a visible character"),
    ]:
        result = leadstage("enqueue", "--name", name, "--apply-to", "lead")
        assert result.returncode == 2
        assert reason in one_error_line(result)
        assert "\x1b" not in result.stderr
        assert "\u202e" not in result.stderr
    long_field = "f" * 100_000
    path_result = leadstage("enqueue", "--file", "-", stdin=json.dumps({long_field: 1, "name": "x", "applyTo": 1}))
    assert path_result.returncode == 2
    assert len(path_result.stderr) < 1000
    assert "(100000 characters)" in path_result.stderr
    assert queued(db) == 0


def test_a_lone_surrogate_is_refused_naming_the_field(leadstage: Run, db: redis.Redis) -> None:
    """Item 8: bytes that are not UTF-8 in an argument become lone surrogates; was "unexpected TypeError"."""
    result = leadstage("enqueue", "--name", "a\udcff", "--apply-to", "1")
    assert result.returncode == 2
    assert "--name: must be valid Unicode text" in one_error_line(result)
    result = leadstage("enqueue", "--name", "a", "--apply-to", "1", "--source", "\udcfe")
    assert "--source: must be valid Unicode text" in one_error_line(result)
    result = leadstage("enqueue", "--file", "-", stdin='{"name": "a\\ud800", "applyTo": 1}\n')
    assert "line 1: not valid JSON" in result.stderr  # JSON cannot carry one either
    assert queued(db) == 0


def test_bad_settings_and_flags_are_one_line_naming_them(leadstage: Run, redis_url: str) -> None:
    """Item 8: each was an "unexpected ..." error before."""
    server = redis_url.rsplit("/", 1)[0]
    cases: list[tuple[tuple[str, ...], dict[str, str], int, str]] = [
        (("webhook", "--port", "99999"), {}, 2, "argument --port: must be a port number 0..65535, not 99999"),
        (("stats",), {"REDIS_URL": f"{server}/99"}, 2, "REDIS_URL selects a database number this Redis does not have"),
        (("stats",), {"REDIS_URL": f"{server}/abc"}, 2, "the database must be a whole number, not 'abc'"),
        (("stats",), {"WEBHOOK_SECRET": "whsec_!!!!"}, 2, "WEBHOOK_SECRET must be a Standard Webhooks secret"),
    ]
    for args, extra_env, status, text in cases:
        result = leadstage(*args, extra_env=extra_env)
        assert result.returncode == status, result.stderr
        assert text in result.stderr.strip().splitlines()[-1], result.stderr
        assert "unexpected" not in result.stderr


def test_errors_name_what_was_given_in_the_command_line_terms(leadstage: Run, db: redis.Redis, tmp_path: Path) -> None:
    """Item 9: a bad duration names the flag; a line of bytes that is not UTF-8 is said to be so
    (orjson calls it a "str" with surrogates), with the byte's place."""
    result = leadstage("dlq", "replay", "--since", "5x")
    assert result.returncode == 2
    assert one_error_line(result).startswith("leadstage: error: --since must be a duration such as 90s")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"name": "Caf\u00e9", "applyTo": 1}\n'.encode("latin-1"))
    result = leadstage("enqueue", "--file", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == "line 2: is not UTF-8 text (byte 14 of the line is 0xe9)"
    assert queued(db) == 0


def test_a_redis_url_at_a_server_that_is_not_redis_is_a_config_error(leadstage: Run) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer_http() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=answer_http, daemon=True)
        thread.start()
        result = leadstage(
            "enqueue", "--name", "x", "--apply-to", "1", extra_env={"REDIS_URL": f"redis://127.0.0.1:{port}/0"}
        )
        thread.join(timeout=10)
    assert result.returncode == 2
    assert "REDIS_URL: what answers there is not Redis" in one_error_line(result)


def test_the_worker_with_redis_down_at_start_is_one_line(leadstage: Run) -> None:
    env = {
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "IVVY_BASE_URL": "http://127.0.0.1:9",
        "IVVY_API_KEY": DEMO_API_KEY,
        "IVVY_API_SECRET": DEMO_API_SECRET,
    }
    result = leadstage("worker", extra_env=env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("leadstage: error: Redis is unavailable: ConnectionError"), result.stderr
    assert "unexpected" not in result.stderr


@contextlib.contextmanager
def own_redis_server(*options: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server of this test on a free port of its own (it may be stopped with SIGSTOP)."""
    port = free_port()
    process = subprocess.Popen(  # noqa: S603 - a fixed command
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *options],  # noqa: S607 - on PATH
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        wait_for(lambda: _answers(client), "the test's redis-server")
        client.close()
        yield process, f"redis://127.0.0.1:{port}/0"
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(timeout=10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_hung_redis_ends_each_command_with_one_line_in_bounded_time(leadstage: Run, tmp_path: Path) -> None:
    """Item 4: with Redis stopped by SIGSTOP the commands hung until killed."""
    path = write_lines(tmp_path / "f.jsonl", GOOD)
    with own_redis_server() as (server, url):
        server.send_signal(signal.SIGSTOP)
        extra = {"REDIS_URL": url, "LEADSTAGE_REDIS_TIMEOUT": "0.5", "LEADSTAGE_REDIS_CONNECT_TIMEOUT": "0.5"}
        for args, written in [
            (("enqueue", "--name", "x", "--apply-to", "1", "--key", "k"), False),
            (("enqueue", "--file", path), False),
            (("stats",), True),
            (("status", "k"), True),
            (("results",), True),
            (("results", "--group", "g"), True),
            (("dlq", "list"), True),
            (("dlq", "replay", "--all"), True),
        ]:
            result = leadstage(*args, extra_env=extra)  # the fixture's own timeout (60 s) fails a hang
            assert result.returncode == 1, result.stderr
            line = one_error_line(result)
            assert "Redis is unavailable: TimeoutError" in line
            assert "LEADSTAGE_REDIS_TIMEOUT 0.5 s" in line
            # Nothing reached Redis: the enqueue says so (the connection's first command got no answer).
            assert line.endswith("; nothing enqueued") != written, line


def test_a_redis_that_takes_no_connection_is_given_up_after_the_connect_timeout(leadstage: Run) -> None:
    """Item 4: connecting has its own bound, LEADSTAGE_REDIS_CONNECT_TIMEOUT, and the error names it.

    A stopped redis-server whose accept queue is full answers no handshake (the kernel drops the
    SYN): with a command timeout of 600 s only the connect timeout can end the command in time.
    """
    with own_redis_server("--tcp-backlog", "1") as (server, url):
        server.send_signal(signal.SIGSTOP)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        held: list[socket.socket] = []
        try:
            for _ in range(64):  # fill the accept queue: the next connection gets no answer
                sock = socket.socket()
                sock.settimeout(0.5)
                try:
                    sock.connect(("127.0.0.1", port))
                except TimeoutError:
                    sock.close()
                    break
                held.append(sock)
            else:
                pytest.fail("the stopped redis-server kept taking connections")
            extra = {"REDIS_URL": url, "LEADSTAGE_REDIS_TIMEOUT": "600", "LEADSTAGE_REDIS_CONNECT_TIMEOUT": "0.5"}
            for args in (("stats",), ("enqueue", "--name", "x", "--apply-to", "1")):
                result = leadstage(*args, extra_env=extra)  # the fixture's own timeout (60 s) fails a hang
                assert result.returncode == 1, result.stderr
                line = one_error_line(result)
                assert "Redis is unavailable: TimeoutError" in line
                assert "LEADSTAGE_REDIS_CONNECT_TIMEOUT 0.5 s" in line
        finally:
            for sock in held:
                sock.close()


class WithholdingProxy:
    """A TCP proxy to a Redis that forwards every request but drops every answer after the
    ``after``-th EVALSHA it forwarded: a Redis that applies a write and then stops answering."""

    def __init__(self, target_port: int, after: int) -> None:
        self.target_port = target_port
        self.after = after
        self.evalshas = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client), daemon=True).start()

    def _requests(self, source: socket.socket, target: socket.socket) -> None:
        tail = b""
        while data := self._recv(source):
            seen = tail + data
            self.evalshas += seen.count(b"EVALSHA") - tail.count(b"EVALSHA")
            tail = seen[-6:]
            target.sendall(data)

    def _answers(self, source: socket.socket, target: socket.socket) -> None:
        while data := self._recv(source):
            if self.evalshas < self.after:
                target.sendall(data)

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def enqueue_script_loaded(db: redis.Redis) -> None:
    """enqueue.lua known to the test Redis, so that its first EVALSHA runs (no NOSCRIPT round)."""
    db.script_load((ROOT / "worker" / "core" / "lua" / "enqueue.lua").read_text())


@pytest.mark.usefixtures("enqueue_script_loaded")
def test_an_enqueue_redis_applied_without_answering_is_unknown_and_a_retry_with_the_key_is_safe(
    leadstage: Run, db: redis.Redis, redis_url: str
) -> None:
    """Item 4: a change is never reported refused when it may have been written."""
    server_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = WithholdingProxy(server_port, after=1)
    database = redis_url.rsplit("/", 1)[1]
    extra = {"REDIS_URL": f"redis://127.0.0.1:{proxy.port}/{database}", "LEADSTAGE_REDIS_TIMEOUT": "1"}
    try:
        result = leadstage("enqueue", "--name", "Hot", "--apply-to", "lead", "--key", "k-unknown", extra_env=extra)
    finally:
        proxy.close()
    assert result.returncode == 1
    line = one_error_line(result)
    assert "whether idempotency key 'k-unknown' got enqueued is unknown, retry with the same key" in line
    assert "nothing enqueued" not in line
    assert db.zrange(keys.queue_key("leadstage:queue", "default"), 0, -1) == [b"default:k-unknown"]  # it was written
    retry = leadstage("enqueue", "--name", "Hot", "--apply-to", "lead", "--key", "k-unknown")
    assert json.loads(retry.stdout)["status"] == "duplicate"


@pytest.mark.usefixtures("enqueue_script_loaded")
def test_a_file_whose_second_write_gets_no_answer_says_which_lines_are_unknown(
    leadstage: Run, db: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    lines = [json.dumps({"name": f"S{i}", "applyTo": 1}) for i in range(1, 2501)]
    path = write_lines(tmp_path / "f.jsonl", *lines)
    server_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    # Three checks, then the second of three writes (each write: the script and the schedule's notice).
    proxy = WithholdingProxy(server_port, after=3 + 2 + 1)
    database = redis_url.rsplit("/", 1)[1]
    extra = {"REDIS_URL": f"redis://127.0.0.1:{proxy.port}/{database}", "LEADSTAGE_REDIS_TIMEOUT": "1"}
    try:
        result = leadstage("enqueue", "--file", path, "--key", "batch", extra_env=extra)
    finally:
        proxy.close()
    assert result.returncode == 1
    receipts = json_lines(result.stdout)
    assert [r["status"] for r in receipts] == ["queued"] * 1000 + ["unknown"] * 1000
    assert [r["line"] for r in receipts] == list(range(1, 2001))
    assert "lines 1001..2000 may or may not be enqueued" in one_error_line(result)
    assert queued(db) == 2000  # the unknown chunk was in fact written, the third was not sent
    retry = leadstage("enqueue", "--file", path, "--key", "batch")
    assert retry.returncode == 0
    statuses = [r["status"] for r in json_lines(retry.stdout)]
    assert statuses == ["duplicate"] * 2000 + ["queued"] * 500


def peak_rss_kib(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run a command to its end; its peak resident memory (KiB) and its stderr."""
    process = subprocess.Popen(  # noqa: S603 - our own command
        command(*args), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    with process.stderr:
        stderr = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, stderr
    return usage.ru_maxrss, stderr


def test_a_big_file_is_enqueued_in_memory_bounded_by_the_chunk_not_the_file(
    env: dict[str, str], db: redis.Redis, tmp_path: Path
) -> None:
    """Item 11: a 200 MB file took 25x its size in memory. Here a file 10x bigger (some 7 MB more)
    must not cost its size in memory, let alone 25x it; and off a terminal, no progress line."""

    def file_of(count: int, name: str) -> tuple[str, int]:
        path = tmp_path / name
        with path.open("w") as out:
            for i in range(count):
                out.write(json.dumps({"name": f"Stage {name} {i}", "colour": "#3a7bd5", "applyTo": 2}) + "\n")
        return str(path), path.stat().st_size

    small, small_size = file_of(10_000, "small")
    big, big_size = file_of(100_000, "big")
    env = {**env, "LEADSTAGE_RATE_LIMIT": "1000000"}  # no warning of a backlog past the maximum age
    small_rss, _ = peak_rss_kib(["enqueue", "--file", small], env)
    big_rss, stderr = peak_rss_kib(["enqueue", "--file", big], env)
    assert queued(db) == 110_000
    grown = (big_rss - small_rss) * 1024
    assert grown < (big_size - small_size), (small_rss, big_rss, big_size)
    assert stderr.count("\n") == 1  # the summary only: stderr is not a terminal
    assert stderr.startswith("enqueued 100000 change(s): 100000 queued")


def test_a_bulk_interrupted_midway_says_which_lines_were_enqueued(
    env: dict[str, str], db: redis.Redis, tmp_path: Path
) -> None:
    """Items 1 and 4: a SIGINT during the writes used to end the command silently, the receipts of
    the last chunks unprinted. Now the chunk written before it has its receipts, the chunk in
    flight is "unknown", one line says so, and nothing after it was written."""
    path = tmp_path / "f.jsonl"
    with path.open("w") as out:
        for i in range(100_000):
            out.write(json.dumps({"name": f"Stage {i}", "applyTo": 2, "idempotency_key": f"k{i}"}) + "\n")
    env = {**env, "LEADSTAGE_RATE_LIMIT": "1000000"}  # no warning of a backlog past the maximum age
    with subprocess.Popen(  # noqa: S603 - our own command, fixed arguments
        command("enqueue", "--file", str(path)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A suite started in the background has SIGINT ignored, and the child would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        first = process.stdout.readline()  # the writes have begun: the first chunk's receipts
        process.send_signal(signal.SIGINT)
        rest = process.stdout.read()  # through the same buffer as the first line
        stderr = process.stderr.read()
        assert process.wait(timeout=60) == 130, stderr
    receipts = [json.loads(line) for line in [first, *rest.splitlines()]]
    assert [r["line"] for r in receipts] == list(range(1, len(receipts) + 1)), "every line up to the last told"
    unknown = {r["idempotency_key"] for r in receipts if r["status"] == "unknown"}
    enqueued = {r["idempotency_key"] for r in receipts if r["status"] == "queued"}
    assert unknown, "the chunk in flight is unknown"
    assert len(enqueued) + len(unknown) < 100_000, "interrupted before the end"
    members = db.zrange(keys.queue_key("leadstage:queue", "default"), 0, -1)
    assert isinstance(members, list)
    in_queue = {member.decode().split(":", 1)[1] for member in members}
    assert enqueued <= in_queue <= enqueued | unknown
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("leadstage: error: interrupted; lines "), stderr
    assert "may or may not be enqueued" in lines[-1]


def test_progress_shows_on_a_terminal_from_the_first_chunk(
    env: dict[str, str], db: redis.Redis, tmp_path: Path
) -> None:
    path = write_lines(tmp_path / "f.jsonl", *[json.dumps({"name": f"S{i}", "applyTo": 1}) for i in range(3000)])
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(  # noqa: S603 - our own command
            command("enqueue", "--file", path), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=terminal
        )
        os.close(terminal)
        shown = b""
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # the terminal's other side closed: the command ended
                break
            if not data:
                break
            shown += data
        assert process.wait(timeout=60) == 0
    finally:
        os.close(controller)
    text = shown.decode()
    assert "lines validated" in text
    assert "3,000 enqueued" in text
    assert "enqueued 3000 change(s)" in text


def test_help_and_a_single_enqueue_import_only_what_they_need(env: dict[str, str], db: redis.Redis) -> None:
    """Item 12: start-up time was mostly imports (bench.startup prints the times themselves)."""
    probe = (
        "import contextlib, sys\n"
        "from worker.cli import main\n"
        "with contextlib.suppress(SystemExit):\n"
        "    main(sys.argv[1:])\n"
        "heavy = ('redis', 'structlog', 'prometheus_client', 'aiohttp', 'arq', 'worker.runner', 'worker.job',\n"
        "         'worker.devtools', 'worker.console', 'worker.cli.bulk', 'worker.cli.reads', 'worker.cli.servers')\n"
        "print('imported:', *sorted(m for m in heavy if m in sys.modules))\n"
    )

    def imported(*args: str) -> str:
        result = subprocess.run(  # noqa: S603 - our own interpreter
            [sys.executable, "-c", probe, *args], env=env, cwd=ROOT, capture_output=True, text=True, check=True
        )
        return result.stdout.splitlines()[-1]

    assert imported("--help") == "imported:"
    assert imported("enqueue", "--help") == "imported:"
    assert imported("enqueue", "--name", "x", "--apply-to", "1") == "imported:"
    assert queued(db) == 1
    # A read command loads its own module, not the enqueue's nor the servers'.
    assert imported("stats") == "imported: redis worker.cli.reads"


def test_a_single_enqueue_imports_neither_redis_py_nor_asyncio(env: dict[str, str], db: redis.Redis) -> None:
    """Issue 12: a single enqueue (what a shell loop runs once per change) took 0.19 s, most of it
    importing redis-py (~60 ms) and asyncio (~30 ms); it talks to Redis through worker.core.resp
    now. Were either imported again, the start-up would regress without any test failing (the
    bench's cli phase shows the time itself). With an iVvy account configured too (a worker's
    host): checking its http:// URL once imported the process toolkit, and asyncio with it."""
    probe = (
        "import sys\n"
        "from worker.cli import main\n"
        "status = main(sys.argv[1:])\n"
        "print(status, *sorted({m.split('.')[0] for m in sys.modules} & {'redis', 'asyncio', 'producers'}))\n"
    )
    result = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", probe, "enqueue", "--name", "Hot", "--apply-to", "lead", "--key", "lean"],
        env={**env, **WORKER_ENV},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    receipt, loaded = result.stdout.splitlines()
    assert json.loads(receipt) == {"job_id": "default:lean", "idempotency_key": "lean", "status": "queued"}
    assert loaded == "0"  # exit status 0, and none of the three imported
    assert db.zrange(keys.queue_key("leadstage:queue", "default"), 0, -1) == [b"default:lean"]


def test_a_line_that_repeats_a_key_is_refused_not_read_as_its_last_value(leadstage: Run, db: redis.Redis) -> None:
    """Item 9: as the webhook refuses a body that repeats a key."""
    result = leadstage("enqueue", "--file", "-", stdin='{"name": "Hot", "applyTo": 1, "name": "Cold"}\n')
    assert result.returncode == 2
    assert "line 1: repeats the key 'name'" in result.stderr
    assert queued(db) == 0
