"""One change enqueued without redis-py nor asyncio: the single ``leadstage enqueue``.

A shell loop runs that command once per change, so its start-up is most of its cost; this path
talks to Redis with ``worker.core.resp`` (a socket) instead. On the wire it is what the library
sends for a one-change batch (``Enqueuing.enqueue_many``): enqueue.lua by EVALSHA, its WAIT when
``LEADSTAGE_REDIS_MIN_REPLICAS`` asks for one and the schedule's notice (ready.lua) in the same
round trip (``scripts.round_trip``), the scripts loaded on NOSCRIPT and only what did not run sent
again (``scripts.not_run``); the receipt and the errors are the library's too: a failure before
the write was sent enqueued nothing (``RedisUnavailable``), one after it leaves the change's fate
unknown (``EnqueueOutcomeUnknown``: retry with the same key).

Left out: the count of changes enqueued past the maximum age (``ENQUEUED_PAST_MAX_AGE``), which a
process that exits at once has nobody to be scraped by. Sentinel, Cluster and URLs with options
(``resp.handles`` says no) take the library's path.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from typing import Any

from worker.core import tracing
from worker.core.bulk import Chunk, encode_changes, enqueue_arguments, receipts
from worker.core.change import Envelope, LeadStageChange
from worker.core.errors import EnqueueOutcomeUnknown, RedisUnavailable, redis_errors
from worker.core.redis_url import parse_redis_url
from worker.core.replies import Receipt, parse_enqueue
from worker.core.resp import Arg, Reply, RespConnection
from worker.core.scripts import not_run, notice_args, ready_keys, require_replicas, round_trip, script_source
from worker.core.settings import Settings

__all__ = ["enqueue_once"]


class _Lua:
    """A script of worker/core/lua/, called by its digest (``sha``), loaded from ``script`` on NOSCRIPT."""

    def __init__(self, name: str) -> None:
        self.script = script_source(name)
        self.sha = hashlib.sha1(self.script.encode(), usedforsecurity=False).hexdigest()

    def call(self, keys: Sequence[Arg], args: Sequence[Arg]) -> tuple[_Lua, tuple[Arg, ...]]:
        return self, ("EVALSHA", self.sha, len(keys), *keys, *args)


def enqueue_once(settings: Settings, change: LeadStageChange, envelope: Envelope) -> Receipt:
    """Enqueue one validated change (``worker.core.change.validate``); its receipt, as the library's."""
    with tracing.producer_span("enqueue", 1, settings.queue_name):
        chunk = Chunk(encode_changes([(change, envelope)], settings.queue_name), [""])
        script_keys, args = enqueue_arguments(settings, "enqueue", chunk.changes)
        notice = _Lua("ready.lua").call(ready_keys(settings.queue_name), notice_args([envelope.account]))
        parts = round_trip(_Lua("enqueue.lua").call(script_keys, args), settings, confirm=True, notice=notice)
        with redis_errors():  # nothing is written until the handshake has been answered
            connection = RespConnection.connect(
                parse_redis_url(settings.redis_url),
                timeout_s=settings.redis_timeout_s,
                connect_timeout_s=settings.redis_connect_timeout_s,
            )
        with contextlib.closing(connection):
            try:
                with redis_errors():
                    replies = _run(connection, parts)
            except RedisUnavailable as exc:
                raise EnqueueOutcomeUnknown(str(exc), enqueued=0, unknown=chunk.envelopes()) from exc
        answers, backlog = parse_enqueue(replies[0])
        (receipt,) = receipts(settings, chunk.envelopes(), chunk.labels, answers, backlog, 0)
        acked = int(replies[1]) if parts[1][0] is None else None  # the part after the call: WAIT, or the notice
        require_replicas(settings, acked, "the enqueued changes")
    return receipt


def _run(connection: RespConnection, parts: Sequence[tuple[_Lua | None, tuple[Arg, ...]]]) -> list[Any]:
    """The round trip, and again for what did not run when Redis lacked a script; an error reply raised."""
    replies: list[Reply] = connection.pipeline([command for _, command in parts])
    missing, again = not_run(parts, replies)
    loaded: list[Reply] = []
    if again:  # a Redis that restarted or flushed its scripts: load them, send again only what did not run
        loaded = connection.pipeline([("SCRIPT", "LOAD", script.script) for script in missing])
        for i, reply in zip(again, connection.pipeline([parts[i][1] for i in again]), strict=True):
            replies[i] = reply
    for reply in (*loaded, *replies):
        if isinstance(reply, Exception):
            raise reply
    return replies
