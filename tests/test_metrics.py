"""worker.core.metrics: the names others rely on, the worker's HTTP endpoint, and gauges read from a real Redis."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from producers import LeadStageProducer
from tests.harness import wait_for_terminal, worker_settings
from worker.core import keys, metrics
from worker.core.errors import ConfigError, RedisUnavailable
from worker.core.processes import free_port
from worker.core.settings import Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy
from worker.runner import running_worker


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def server() -> Iterator[metrics.MetricsServer]:
    started = metrics.start_metrics_server(free_port(), host="127.0.0.1")
    assert started is not None
    try:
        yield started
    finally:
        started.close()


async def scrape(port: int) -> dict[str, Metric]:
    """GET /metrics of the endpoint on ``port``, parsed: family name -> family."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Metric], sample_name: str, **labels: str) -> float:
    """One sample's value; 0 when the series has none yet."""
    matches = (s.value for f in families.values() for s in f.samples if s.name == sample_name and s.labels == labels)
    return next(matches, 0.0)


async def test_the_documented_series_after_real_work(
    server: metrics.MetricsServer, redis_url: str, redis_client: aioredis.Redis, fake_ivvy: RunningFakeIvvy
) -> None:
    """A change through a real worker and the fake iVvy, then /metrics as Prometheus scrapes it."""
    settings = worker_settings(redis_url, fake_ivvy.url)
    before = await scrape(server.port)
    async with LeadStageProducer(settings, redis=redis_client) as producer, running_worker(settings):
        await producer.enqueue({"name": "Scraped", "applyTo": "lead"}, idempotency_key="scraped")
        await wait_for_terminal(redis_client, ["scraped"])
    after = await scrape(server.port)

    # prometheus-client adds a ``_created`` gauge beside each counter and histogram in this format.
    kinds = {n: f.type for n, f in after.items() if n.startswith("leadstage_") and not n.endswith("_created")}
    assert kinds == {
        "leadstage_changes": "counter",
        "leadstage_changes_sent": "counter",
        "leadstage_batches_collected": "counter",
        "leadstage_attempts": "counter",
        "leadstage_ivvy_request_seconds": "histogram",
        "leadstage_queue_depth": "gauge",
        "leadstage_in_progress": "gauge",
        "leadstage_dead_letters": "gauge",
        "leadstage_dead_lettered": "counter",
        "leadstage_rate_limit_waits": "counter",
        "leadstage_rate_limit_wait_seconds": "counter",
        "leadstage_enqueued": "counter",
        "leadstage_enqueued_past_max_age": "counter",
        "leadstage_clock_skew_seconds": "gauge",
        "leadstage_clock_skew_errors": "counter",
        "leadstage_webhook_requests": "counter",
    }
    moved = {
        ("leadstage_changes_total", (("account", "default"), ("outcome", "succeeded"))),
        ("leadstage_changes_sent_total", (("account", "default"), ("sent_as", "alone"))),
        ("leadstage_attempts_total", (("account", "default"), ("operation", "add"), ("result", "ok"))),
        ("leadstage_enqueued_total", (("producer", "library"), ("status", "queued"))),
        ("leadstage_ivvy_request_seconds_count", (("account", "default"), ("action", "addOrUpdateLeadStage"))),
    }
    for name, labels in moved:
        delta = value(after, name, **dict(labels)) - value(before, name, **dict(labels))
        assert delta == 1, f"{name}{dict(labels)} moved by {delta}"
    bounds = {s.labels["le"] for s in after["leadstage_ivvy_request_seconds"].samples if s.name.endswith("_bucket")}
    assert {"0.001", "30.0", "+Inf"} <= bounds


async def test_worker_endpoint_serves_the_metrics_over_http(server: metrics.MetricsServer) -> None:
    before = sample("leadstage_changes_total", account="metrics-test", outcome="succeeded")
    metrics.CHANGES.labels("metrics-test", "succeeded").inc()
    metrics.CHANGES.labels("metrics-test", "succeeded").inc()
    metrics.ATTEMPTS.labels("metrics-test", "update", "retryable").inc()
    metrics.IVVY_LATENCY.labels("metrics-test", "addOrUpdateLeadStage").observe(0.003)
    metrics.ENQUEUED.labels("cli", "duplicate").inc()

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.port}/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    changes = ("leadstage_changes_total", (("account", "metrics-test"), ("outcome", "succeeded")))
    assert samples[changes] == before + 2
    attempts = (
        "leadstage_attempts_total",
        (("account", "metrics-test"), ("operation", "update"), ("result", "retryable")),
    )
    assert samples[attempts] >= 1
    bucket = (
        "leadstage_ivvy_request_seconds_bucket",
        (("account", "metrics-test"), ("action", "addOrUpdateLeadStage"), ("le", "0.005")),
    )
    assert samples[bucket] >= 1
    assert samples[("leadstage_enqueued_total", (("producer", "cli"), ("status", "duplicate")))] >= 1
    assert ("leadstage_queue_depth", ()) in samples


def test_port_zero_turns_the_server_off() -> None:
    assert metrics.start_metrics_server(0) is None


def test_port_in_use_is_a_config_error_naming_the_setting() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = int(holder.getsockname()[1])
        with pytest.raises(ConfigError, match=rf"LEADSTAGE_METRICS_PORT: port {port} .* is already in use"):
            metrics.start_metrics_server(port, host="127.0.0.1")


def test_render_latest_for_get_metrics() -> None:
    metrics.WEBHOOK_REQUESTS.labels("202").inc()
    body, content_type = metrics.render_latest()
    assert content_type.startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    assert "leadstage_webhook_requests" in families
    assert "leadstage_dead_letters" in families
    body, content_type = metrics.render_latest("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


async def test_refresh_queue_gauges_reads_redis(redis_client: aioredis.Redis) -> None:
    settings = Settings(queue_name="leadstage:test-queue", dlq_stream="leadstage:test-dlq")
    await redis_client.delete(keys.PENDING)
    await redis_client.hset(keys.PENDING, mapping={"default": 2, "other": 1})  # type: ignore[misc]  # redis-py's async stubs
    for n in range(4):
        await redis_client.xadd(settings.dlq_stream, {"idempotency_key": f"k{n}"})
    metrics.IN_PROGRESS.set(5)  # this worker's own count: refresh leaves it alone

    await metrics.refresh_queue_gauges(redis_client, settings)
    assert sample("leadstage_queue_depth") == 3
    assert sample("leadstage_dead_letters") == 4
    assert sample("leadstage_in_progress") == 5

    await redis_client.hincrby(keys.PENDING, "default", -1)  # type: ignore[misc]  # redis-py's async stubs
    await redis_client.delete(settings.dlq_stream)
    await metrics.refresh_queue_gauges(redis_client, settings)
    assert sample("leadstage_queue_depth") == 2
    assert sample("leadstage_dead_letters") == 0
    metrics.IN_PROGRESS.set(0)


async def test_refresh_queue_gauges_without_redis_raises_redis_unavailable() -> None:
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        with pytest.raises(RedisUnavailable):
            await metrics.refresh_queue_gauges(client, Settings())
    finally:
        await client.aclose()
