"""The single ``leadstage enqueue`` (worker.core.one_shot, over worker.core.resp: no redis-py)
says what the library's path says, for each way Redis can answer: scripts flushed, replicas
missing, a database it does not have, credentials refused, out of memory, read-only, TLS, a Unix
socket. (Redis down, hung, slow to accept, not Redis, an ACL user without the scripts, and no
answer after the write are tests/test_cli.py's, which run the same command.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import redis

from tests.conftest import TEST_REDIS_PASSWORD
from tests.test_cli import Run, db, env, leadstage, one_error_line, own_redis_server, queued
from worker.core.processes import free_port

__all__ = ["db", "env", "leadstage"]  # fixtures of tests/test_cli.py, used here by name

HOT = ("enqueue", "--name", "Hot", "--apply-to", "lead", "--key", "k1")


def status_of(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["status"])


def test_scripts_flushed_are_loaded_again_and_the_change_written_once(leadstage: Run, db: redis.Redis) -> None:
    """NOSCRIPT: the script is loaded and only what did not run is sent again."""
    db.script_flush()
    assert status_of(leadstage(*HOT)) == "queued"
    db.script_flush()
    assert status_of(leadstage(*HOT)) == "duplicate"
    assert queued(db) == 1
    assert db.zcard("{leadstage:queue}:ready") == 1  # the schedule's notice ran too


def test_fewer_replicas_than_required_is_an_unknown_outcome_and_a_retry_is_safe(tmp_path: Path, leadstage: Run) -> None:
    """LEADSTAGE_REDIS_MIN_REPLICAS against a Redis without a replica: written, not confirmed."""
    with own_redis_server("--dir", str(tmp_path)) as (_, url):
        client = redis.Redis.from_url(url)
        extra = {"REDIS_URL": url, "LEADSTAGE_REDIS_MIN_REPLICAS": "1", "LEADSTAGE_REDIS_REPLICA_TIMEOUT": "0.1"}
        for flushed in (False, True):  # WAIT is sent again after a NOSCRIPT, with the call
            if flushed:
                client.script_flush()
            result = leadstage(*HOT, extra_env=extra)
            assert result.returncode == 1, result.stderr
            line = one_error_line(result)
            assert "the enqueued changes: written to the Redis primary but confirmed by 0 of 1 replicas" in line
            assert "retry with the same idempotency key" in line
            assert "nothing enqueued" not in line
        assert client.zrange("leadstage:queue:{default}", 0, -1) == [b"default:k1"]
        assert status_of(leadstage(*HOT, extra_env={"REDIS_URL": url})) == "duplicate"
        client.close()


def test_a_database_the_server_does_not_have_or_not_a_number_is_a_config_error(leadstage: Run, redis_url: str) -> None:
    server = redis_url.rsplit("/", 1)[0]
    for database, text in (
        ("99", "REDIS_URL selects a database number this Redis does not have"),
        ("abc", "the database must be a whole number, not 'abc'"),
    ):
        result = leadstage(*HOT, extra_env={"REDIS_URL": f"{server}/{database}"})
        assert result.returncode == 2, result.stderr
        assert text in one_error_line(result)


def test_credentials_refused_are_one_line_without_the_password(tmp_path: Path, leadstage: Run) -> None:
    wrong = "a-wrong-password-of-length"
    with own_redis_server("--dir", str(tmp_path)) as (_, url):
        admin = redis.Redis.from_url(url)
        admin.config_set("requirepass", TEST_REDIS_PASSWORD)  # once it answered own_redis_server's PING
        admin.close()
        where = url.removeprefix("redis://")
        for given in (f"redis://:{wrong}@{where}", f"redis://nobody:{TEST_REDIS_PASSWORD}@{where}", url):
            result = leadstage(*HOT, extra_env={"REDIS_URL": given})
            assert result.returncode == 1, result.stderr
            line = one_error_line(result)
            assert line.startswith("leadstage: error: Redis refused the credentials of REDIS_URL: AuthenticationError")
            assert line.endswith("; nothing enqueued")  # refused at the handshake, before the write
            assert wrong not in result.stderr
            assert TEST_REDIS_PASSWORD not in result.stderr
        right = f"redis://default:{TEST_REDIS_PASSWORD}@{where}"
        assert status_of(leadstage(*HOT, extra_env={"REDIS_URL": right})) == "queued"
    with own_redis_server("--dir", str(tmp_path)) as (_, url):  # a password for a Redis that has none
        result = leadstage(*HOT, extra_env={"REDIS_URL": url.replace("redis://", f"redis://:{wrong}@")})
        assert "Redis refused the credentials of REDIS_URL" in one_error_line(result)


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        (("--maxmemory", "1"), "OutOfMemoryError"),
        (("--replicaof", "127.0.0.1", "1"), "ReadOnlyError"),  # a replica (of nobody): read-only
    ],
)
def test_a_refused_write_may_have_been_applied_so_its_outcome_is_unknown(
    tmp_path: Path, leadstage: Run, options: tuple[str, ...], refusal: str
) -> None:
    """As the library's path says it: a refusal read after the write was sent is not "nothing enqueued"."""
    with own_redis_server("--dir", str(tmp_path), *options) as (_, url):
        result = leadstage(*HOT, extra_env={"REDIS_URL": url})
    assert result.returncode == 1, result.stderr
    line = one_error_line(result)
    assert f"Redis refused the command: {refusal}: whether idempotency key 'k1' got enqueued is unknown" in line


@pytest.mark.parametrize("how", ["one change", "a file"])
def test_a_queue_key_holding_another_kind_of_value_is_one_line_and_enqueues_nothing(
    leadstage: Run, db: redis.Redis, tmp_path: Path, how: str
) -> None:
    """Over either client (the RESP one for one change, redis-py for a file): exit 2 naming the key,
    and the retry after the key is cleared enqueues the change (it was not half-written)."""
    queue = "leadstage:queue:{default}"
    db.set(queue, "another program's")
    lines = tmp_path / "changes.jsonl"
    lines.write_text('{"name": "Hot", "applyTo": 1}\n{"id": 8, "name": "Cold"}\n')
    args = HOT if how == "one change" else ("enqueue", "--file", str(lines), "--key", "k1")
    result = leadstage(*args)
    assert result.returncode == 2, result.stderr
    assert f"Redis holds a string at '{queue}', where leadstage keeps a zset" in one_error_line(result)
    assert db.keys("leadstage:ledger:*") == []
    db.delete(queue)
    assert leadstage(*args).returncode == 0
    assert queued(db) == (1 if how == "one change" else 2)


def test_a_tls_redis_is_reached_with_the_certificate_checked(tmp_path: Path, leadstage: Run) -> None:
    """rediss:// as redis-py connects by default: the server's certificate must be trusted (here
    through SSL_CERT_FILE), its host name is not checked."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(  # noqa: S603 - a fixed command
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=leadstage-test",  # noqa: S607 - on PATH
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    tls_port = free_port()
    tls = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key))
    with own_redis_server(
        "--dir", str(tmp_path), *tls, "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"
    ) as (
        _,
        url,
    ):
        rediss = f"rediss://127.0.0.1:{tls_port}/3"
        result = leadstage(*HOT, extra_env={"REDIS_URL": rediss, "SSL_CERT_FILE": str(cert)})
        assert status_of(result) == "queued"
        client = redis.Redis.from_url(url.rsplit("/", 1)[0] + "/3")
        assert client.zrange("leadstage:queue:{default}", 0, -1) == [b"default:k1"]
        client.close()
        untrusted = leadstage(*HOT, extra_env={"REDIS_URL": rediss, "SSL_CERT_FILE": str(tmp_path / "none.pem")})
        assert untrusted.returncode == 1
        assert one_error_line(untrusted).startswith("leadstage: error: Redis is unavailable: ConnectionError")


def test_a_unix_socket_redis_is_reached_in_the_database_of_its_url(tmp_path: Path, leadstage: Run) -> None:
    sock = tmp_path / "redis.sock"
    with own_redis_server("--dir", str(tmp_path), "--unixsocket", str(sock)) as (_, url):
        assert status_of(leadstage(*HOT, extra_env={"REDIS_URL": f"unix://{sock}?db=2"})) == "queued"
        client = redis.Redis.from_url(url.rsplit("/", 1)[0] + "/2")
        assert client.zrange("leadstage:queue:{default}", 0, -1) == [b"default:k1"]
        client.close()


def test_a_cluster_url_takes_the_library_path_and_says_the_same(leadstage: Run, cluster_url: str) -> None:
    """The RESP client does not follow a cluster's redirections: ``resp.handles`` sends a
    redis+cluster:// URL to redis-py's path, with the same receipts."""
    extra = {"REDIS_URL": cluster_url}
    assert status_of(leadstage(*HOT, extra_env=extra)) == "queued"
    assert status_of(leadstage(*HOT, extra_env=extra)) == "duplicate"
    conflict = leadstage("enqueue", "--name", "Cold", "--apply-to", "lead", "--key", "k1", extra_env=extra)
    assert conflict.returncode == 2
    assert "is already used for a different change; nothing enqueued" in one_error_line(conflict)
