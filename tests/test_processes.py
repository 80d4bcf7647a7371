"""worker.core.processes: children are always stopped, the signal wait ends work cleanly, Redis restarts keep data."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.harness import LosingCancellations
from worker.core.errors import ProcessFailed
from worker.core.processes import SOURCE_ROOT, Children, RedisServer, cancel_until_done, free_port, wait_for_port

#: A child that ignores SIGTERM: only SIGKILL stops it.
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
)

#: A child that waits for a signal in ``until_signalled``, then says what it returned.
WAITER = """
import asyncio
from worker.core.processes import until_signalled

async def work():
    print("ready", flush=True)
    await asyncio.sleep(60)
    return "slept"

print("result:", asyncio.run(until_signalled(work())), flush=True)
"""


def wait_for_line(path: Path, text: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{path.name} never said {text!r}: {path.read_text()}"
        time.sleep(0.02)


def test_a_child_that_ignores_sigterm_is_killed_after_its_grace(tmp_path: Path) -> None:
    with Children(tmp_path) as children:
        stubborn = children.start("stubborn", [sys.executable, "-c", STUBBORN])
        wait_for_line(stubborn.log_path, "ready")
        assert children.stop(stubborn, grace=0.2) == -signal.SIGKILL
        assert children.children == []


def test_leaving_the_group_stops_every_child_newest_first(tmp_path: Path) -> None:
    with Children(tmp_path) as children:
        started = [children.start(f"sleeper-{n}", ["sleep", "60"]) for n in range(3)]
        assert all(child.alive() for child in started)
    assert [child.returncode for child in started] == [-signal.SIGTERM] * 3
    assert children.children == []


def test_until_signalled_cancels_the_work_and_returns_none_on_sigterm(tmp_path: Path) -> None:
    with Children(tmp_path) as children:
        waiter = children.start("waiter", [sys.executable, "-c", WAITER])
        wait_for_line(waiter.log_path, "ready")
        waiter.send_signal(signal.SIGTERM)
        assert waiter.wait(20) == 0
    assert "result: None" in waiter.log_path.read_text()


def test_wait_for_port_fails_early_when_the_process_exits(tmp_path: Path) -> None:
    with Children(tmp_path) as children:
        quitter = children.start("quitter", ["false"])
        with pytest.raises(ProcessFailed, match="exited with status 1"):
            wait_for_port(free_port(), 20, quitter.popen)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH")
def test_a_durable_redis_keeps_what_it_acknowledged_across_a_crash(tmp_path: Path) -> None:
    with Children(tmp_path) as children:
        server = RedisServer(children, tmp_path / "data", durable=True)
        server.start()
        with redis.Redis.from_url(server.url) as client:
            client.set("kept", "yes")
        server.restart(crash=True, down_s=0)
        with redis.Redis.from_url(server.url) as client:
            assert client.get("kept") == b"yes"
        assert server.restarts == 1


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH")
def test_a_paused_redis_answers_nothing_until_resumed(tmp_path: Path) -> None:
    with Children(tmp_path) as children:
        server = RedisServer(children, tmp_path / "data")
        server.start()
        with redis.Redis.from_url(server.url, socket_timeout=0.3) as client:
            server.pause()
            with pytest.raises(redis.TimeoutError):
                client.ping()
            server.resume()
            assert client.ping() is True
            server.pause()
        server.kill()  # a paused server dies too
        assert not server.child.alive()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH")
def test_a_sentinel_is_started_from_its_configuration_lines(tmp_path: Path) -> None:
    with Children(tmp_path) as children:
        primary = RedisServer(children, tmp_path / "primary")
        primary.start()
        sentinel = RedisServer(
            children, tmp_path / "sentinel", sentinel=True, args=(f"sentinel monitor main 127.0.0.1 {primary.port} 1",)
        )
        sentinel.start()
        with redis.Redis(host="127.0.0.1", port=sentinel.port, decode_responses=True) as client:
            assert client.sentinel_get_master_addr_by_name("main") == ("127.0.0.1", primary.port)
        # Started again where it was: the same port, its configuration kept.
        sentinel.restart(crash=True, down_s=0)
        with redis.Redis(host="127.0.0.1", port=sentinel.port, decode_responses=True) as client:
            assert client.sentinel_get_master_addr_by_name("main") == ("127.0.0.1", primary.port)


def test_the_source_root_holds_the_packages_children_import() -> None:
    assert (SOURCE_ROOT / "worker" / "__init__.py").is_file()
    assert (SOURCE_ROOT / "bench" / "procs.py").is_file()


async def test_cancel_until_done_ends_a_task_that_loses_a_cancellation() -> None:
    """redis-py (5.3, with a socket timeout) can swallow a cancellation that lands while it reads:
    a worker whose heartbeat did so waited for it for good at shutdown."""
    body = LosingCancellations(1)
    task = asyncio.create_task(body.run())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_until_done(task), timeout=5)  # a guard against hanging the suite
    assert task.cancelled()
    assert body.lost == 1
