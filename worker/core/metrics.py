"""Prometheus metrics of leadstage-sync, defined once for the worker and the producers.

The worker serves them on its own port (``start_metrics_server``, LEADSTAGE_METRICS_PORT); the
HTTP producer serves them at ``GET /metrics`` (``render_latest``). Labels carry account names,
operations, outcomes and status codes only: never a secret, an idempotency key or a stage id
(unbounded label values would grow the registry without end).

QUEUE_DEPTH and DEAD_LETTERS describe Redis, not this process: ``refresh_queue_gauges`` sets them
from Redis, so every instance reports the same numbers (aggregate with max). IN_PROGRESS is per
process: each worker sets it to the changes it is attempting (aggregate with sum).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from redis.asyncio import Redis, RedisCluster

from worker.core import keys
from worker.core.errors import ConfigError, redis_errors
from worker.core.settings import Settings

__all__ = [
    "ATTEMPTS",
    "BATCHES_COLLECTED",
    "CHANGES",
    "CHANGES_SENT",
    "CLOCK_SKEW",
    "CLOCK_SKEW_ERRORS",
    "DEAD_LETTERED",
    "DEAD_LETTERS",
    "ENQUEUED",
    "ENQUEUED_PAST_MAX_AGE",
    "IN_PROGRESS",
    "IVVY_LATENCY",
    "QUEUE_DEPTH",
    "RATE_LIMIT_WAITS",
    "RATE_LIMIT_WAIT_SECONDS",
    "WEBHOOK_REQUESTS",
    "MetricsServer",
    "counted_changes",
    "refresh_queue_gauges",
    "render_latest",
    "start_metrics_server",
]

#: outcome: succeeded / failed / superseded (the terminal events of the results stream).
CHANGES = Counter(
    "leadstage_changes_total", "Changes that reached a terminal state, by outcome", ["account", "outcome"]
)

#: sent_as: alone / coalesced / batch (how the change that reached a terminal state was sent; nothing sent:
#: not counted).
CHANGES_SENT = Counter(
    "leadstage_changes_sent_total",
    "Changes that reached a terminal state, by how they were sent",
    ["account", "sent_as"],
)

#: A dead worker's batch whose results another worker collected (docs/contract.md: Batches).
BATCHES_COLLECTED = Counter(
    "leadstage_batches_collected_total", "Batches of a dead worker whose results another worker collected", ["account"]
)

#: operation: add / update; result: ok / retryable / permanent.
ATTEMPTS = Counter(
    "leadstage_attempts_total", "Attempts to apply a change, by result", ["account", "operation", "result"]
)

#: action: the iVvy action called (addOrUpdateLeadStage, getLeadStageList, ping).
IVVY_LATENCY = Histogram(
    "leadstage_ivvy_request_seconds",
    "Latency of requests to iVvy",
    ["account", "action"],
    # 1 ms (the fake on loopback) to 30 s (beyond the default 10 s request timeout).
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

#: iVvy's clock (the Date header of its last answer) minus this process's, per account.
CLOCK_SKEW = Gauge(
    "leadstage_clock_skew_seconds", "iVvy's clock minus this worker's, from iVvy's Date header", ["account"]
)
#: Stale-request answers (23005): each pauses the account (the worker's clock is off, not the change).
CLOCK_SKEW_ERRORS = Counter(
    "leadstage_clock_skew_errors_total", "iVvy answers that found this worker's clock stale (23005)", ["account"]
)

QUEUE_DEPTH = Gauge("leadstage_queue_depth", "Changes waiting in the queue")
#: Per process: set by the worker to len(its running jobs).
IN_PROGRESS = Gauge("leadstage_in_progress", "Changes being attempted now")
DEAD_LETTERS = Gauge("leadstage_dead_letters", "Entries in the dead-letter stream")

DEAD_LETTERED = Counter("leadstage_dead_lettered_total", "Changes sent to the dead-letter stream", ["account"])

RATE_LIMIT_WAITS = Counter(
    "leadstage_rate_limit_waits_total", "Times a job waited for the account's rate limit", ["account"]
)
RATE_LIMIT_WAIT_SECONDS = Counter(
    "leadstage_rate_limit_wait_seconds_total", "Seconds jobs spent waiting for the account's rate limit", ["account"]
)

#: producer: library / cli / webhook; status: queued / duplicate.
ENQUEUED = Counter("leadstage_enqueued_total", "Changes accepted by a producer, by status", ["producer", "status"])

#: Changes queued behind a backlog that the account's rate limit cannot send within LEADSTAGE_MAX_AGE.
ENQUEUED_PAST_MAX_AGE = Counter(
    "leadstage_enqueued_past_max_age_total",
    "Changes enqueued behind a backlog longer than the maximum age at the account's rate limit",
    ["account"],
)

#: status: the HTTP status code answered, as text ("202", "400"...): the changes endpoint's
#: requests, and every request the HTTP parser refused before any route (it may name none).
WEBHOOK_REQUESTS = Counter("leadstage_webhook_requests_total", "HTTP producer requests by status code", ["status"])


async def refresh_queue_gauges(redis: Redis | RedisCluster, settings: Settings) -> None:
    """Set QUEUE_DEPTH and DEAD_LETTERS from Redis, in one round trip.

    QUEUE_DEPTH is the sum of ``keys.PENDING``: the changes enqueued and not yet terminal (waiting,
    deferred for a retry and being attempted), over every account's queue. IN_PROGRESS is not
    read from Redis: arq's in-progress marks can only be counted by SCAN, too dear for every
    heartbeat, so each worker sets it to its own running jobs and Prometheus sums the workers.

    Raises ``RedisUnavailable`` when Redis does not answer (the gauges keep their last values).
    """
    from worker.core.pending import backlogs

    if isinstance(redis, RedisCluster):  # each account's count in its slot: read apart
        pending = list((await backlogs(redis, settings)).values())
        with redis_errors():
            dead = await redis.xlen(settings.dlq_stream)
    else:
        with redis_errors():
            # Independent reads: no MULTI needed, one round trip is what matters.
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hvals(keys.PENDING)
                pipe.xlen(settings.dlq_stream)
                pending, dead = await pipe.execute()
    QUEUE_DEPTH.set(sum(int(count) for count in pending))
    DEAD_LETTERS.set(int(dead))


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """The worker's metrics HTTP server (a daemon thread); ``close()`` stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        """Stop serving, at once: the server's loop sees the stop only when its select returns,
        every 0.5 s (``serve_forever``'s poll), so a connection of its own wakes it until it has."""
        stopping = threading.Thread(target=self.server.shutdown, daemon=True)
        stopping.start()
        host, port = self.server.server_address[:2]
        wake = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(str(host), str(host))  # noqa: S104 - not bound, compared
        while stopping.is_alive():
            with contextlib.suppress(OSError), socket.create_connection((wake, int(port)), timeout=0.5):
                pass
            stopping.join(timeout=0.02)
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(port: int, host: str = "0.0.0.0") -> MetricsServer | None:  # noqa: S104 - scraped from other hosts
    """Serve the metrics at http://host:port/metrics; port 0 turns it off (returns None).

    A port that cannot be bound (in use, not permitted) is a configuration error naming
    LEADSTAGE_METRICS_PORT, so the worker stops at start with one clear line.
    """
    if port == 0:
        return None
    try:
        server, thread = prometheus_client.start_http_server(port, addr=host)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            reason = "is already in use"
        else:
            reason = f"cannot be used ({exc.strerror or type(exc).__name__})"
        raise ConfigError(
            f"LEADSTAGE_METRICS_PORT: port {port} on {host} {reason}; choose another port, or 0 to turn metrics off"
        ) from None
    return MetricsServer(server, thread)


def counted_changes(account: str, outcome: str) -> float | None:
    """This process's ``leadstage_changes_total`` of ``account`` and ``outcome`` (None before the first)."""
    return prometheus_client.REGISTRY.get_sample_value(
        "leadstage_changes_total", {"account": account, "outcome": outcome}
    )


def render_latest(accept: str | None = None) -> tuple[bytes, str]:
    """The metrics as (body, content type) for GET /metrics, in the format ``accept`` asks for.

    Without an Accept header this is the classic Prometheus text format (version 0.0.4), the
    same negotiation prometheus_client's own server does.
    """
    encoder, content_type = choose_encoder(accept or "")
    return encoder(prometheus_client.REGISTRY), content_type
