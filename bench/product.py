"""The product as a user runs it: the producer library, ``leadstage worker`` and the results stream.

The worker process is the product's own entry point (``worker.runner.run_worker``: uvloop when
installed, ``build_worker``, arq's run loop) configured from the environment exactly as
``leadstage worker`` is, with the rate limit set out of the way (1e6/s) and metrics off.
Producers use ``producers.LeadStageProducer``; while that library is not importable (it is
being written), ``worker.core.ledger.Ledger.enqueue_many`` over ``parse_change``/``parse_envelope``,
which is what the library calls.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis

from bench.infra import BenchError
from bench.measure import Probe
from bench.workload import Change, Item
from worker.core.change import DEFAULT_ACCOUNT, parse_change, parse_envelope
from worker.core.ledger import Ledger, Receipt
from worker.core.settings import Account, Secret, Settings
from worker.core.states import TERMINAL

#: Far above what one worker can do, so the shared rate limiter never makes a job wait.
UNLIMITED_RATE = 1_000_000.0
#: Stream entries read per XRANGE when collecting results.
PAGE = 5000


def product_env(redis_url: str, ivvy_url: str, api_key: str, api_secret: str) -> dict[str, str]:
    """The environment of ``leadstage worker`` for the benchmark (read with ``Settings.from_env``)."""
    account = Account(DEFAULT_ACCOUNT, ivvy_url, api_key, Secret(api_secret), UNLIMITED_RATE)
    settings = Settings(
        redis_url=redis_url,
        accounts={DEFAULT_ACCOUNT: account},
        rate_limit=UNLIMITED_RATE,
        metrics_port=0,
        log_format="json",
    )
    return settings.to_env()


def run_product_worker(settings: Settings, *, uvloop: bool) -> int:
    """``leadstage worker``: the product's logging, then ``run_worker`` (which installs uvloop).

    ``uvloop=False`` runs the same worker on the standard asyncio loop, to price uvloop.
    """
    from worker.core.logs import configure_logging
    from worker.runner import build_worker, run_worker

    configure_logging(settings)
    if uvloop:
        return run_worker(settings)
    build_worker(settings).run()
    return 0


class _Enqueuer(Protocol):
    """How the product side enqueues: the library, or the ledger while the library is missing."""

    #: The enqueuing connection, warmed up before any phase so its set-up is not counted.
    redis: aioredis.Redis

    async def enqueue_many(self, items: Sequence[Item]) -> list[Receipt]: ...

    async def aclose(self) -> None: ...


class _LibraryEnqueuer:
    """``producers.LeadStageProducer``: validation, conflict check, batched enqueue.lua.

    The module is passed in rather than imported here, so that the benchmark still runs on a
    checkout that predates the library (``_make_enqueuer`` decides); hence ``Any``.
    """

    def __init__(self, settings: Settings, library: Any) -> None:
        self._library = library
        self._producer = library.LeadStageProducer(settings)
        self.redis: aioredis.Redis = self._producer.redis

    async def enqueue_many(self, items: Sequence[Item]) -> list[Receipt]:
        change_items = [self._library.ChangeItem(change, idempotency_key=key) for key, change in items]
        if len(change_items) == 1:
            item = change_items[0]
            receipt: Receipt = await self._producer.enqueue(item.change, idempotency_key=item.idempotency_key)
            return [receipt]
        receipts: list[Receipt] = await self._producer.enqueue_many(change_items)
        return receipts

    async def aclose(self) -> None:
        await self._producer.aclose()


class _LedgerEnqueuer:
    """The fallback while the library is not there: what it does, through the ledger directly."""

    def __init__(self, settings: Settings) -> None:
        self.redis = aioredis.Redis.from_url(settings.redis_url)
        self._ledger = Ledger(self.redis, settings)

    async def enqueue_many(self, items: Sequence[Item]) -> list[Receipt]:
        validated = [(parse_change(change), parse_envelope(idempotency_key=key)) for key, change in items]
        return await self._ledger.enqueue_many(validated)

    async def aclose(self) -> None:
        await self.redis.aclose()


def _make_enqueuer(settings: Settings, *, library_allowed: bool) -> tuple[_Enqueuer, str]:
    """The library when it can be imported (and is allowed), else the ledger; and which it is."""
    if library_allowed:
        try:
            library = importlib.import_module("producers")
        except ImportError:
            library = None
        # An empty ``producers`` directory imports as a namespace package without the class.
        if hasattr(library, "LeadStageProducer") and hasattr(library, "ChangeItem"):
            return _LibraryEnqueuer(settings, library), "producers.LeadStageProducer"
    return _LedgerEnqueuer(settings), "worker.core.ledger.Ledger.enqueue_many"


class ProductSide:
    """The product seen by the phases (``bench.side.Side``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        name: str = "product",
        uvloop: bool = True,
        use_library: bool = True,
        worker_env: Mapping[str, str] | None = None,
    ) -> None:
        """``name`` and ``worker_env`` make a variant: the same product with its worker run differently."""
        self.name = name
        self.settings = settings
        self.worker_env: Mapping[str, str] = dict(worker_env or {})
        self.use_library = use_library
        self.queue_name = settings.queue_name
        self.uvloop = uvloop
        self._enqueuer: _Enqueuer | None = None
        self._redis: aioredis.Redis | None = None
        #: Which producer API the run used (the library, or the ledger fallback).
        self.producer_api = ""

    @property
    def enqueuer(self) -> _Enqueuer:
        if self._enqueuer is None:
            raise BenchError("ProductSide.connect() was not called")
        return self._enqueuer

    async def connect(self) -> None:
        enqueuer, self.producer_api = _make_enqueuer(self.settings, library_allowed=self.use_library)
        self._enqueuer = enqueuer
        self._redis = aioredis.Redis.from_url(self.settings.redis_url)
        await self._redis.ping()
        await enqueuer.redis.ping()

    async def aclose(self) -> None:
        if self._enqueuer is not None:
            await self._enqueuer.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    def worker_args(self) -> list[str]:
        return ["product-worker", *([] if self.uvloop else ["--no-uvloop"])]

    async def enqueue_one(self, key: str, change: Change) -> str:
        (handle,) = await self.enqueue_bulk([(key, change)])
        return handle

    async def enqueue_bulk(self, items: Sequence[Item]) -> list[str]:
        receipts = await self.enqueuer.enqueue_many(items)
        if any(r.status != "queued" for r in receipts):
            raise BenchError("the product answered 'duplicate' for a new key: was the database flushed?")
        return [r.idempotency_key for r in receipts]

    async def finished_count(self, probe: Probe, enqueued: int) -> int:
        return await probe.xlen(self.settings.results_stream)

    async def settled(self, probe: Probe, expected: int) -> bool:
        # The terminal event is the user-visible completion; the queue entry goes with it (or,
        # with arq's own finish, right after), so wait for both before the counters are read.
        return await probe.xlen(self.settings.results_stream) >= expected and await probe.zcard(self.queue_name) == 0

    async def finish_times(self, handles: Sequence[str]) -> Mapping[str, float]:
        """When each terminal event was added to the results stream (its entry id, in ms)."""
        if self._redis is None:
            raise BenchError("ProductSide.connect() was not called")
        wanted = set(handles)
        finished: dict[str, float] = {}
        start = "-"
        while True:
            page = await self._redis.xrange(self.settings.results_stream, min=start, count=PAGE)
            for entry_id, fields in page:
                event = fields[b"event"].decode()
                key = fields[b"idempotency_key"].decode()
                if event not in TERMINAL or key not in wanted:
                    continue
                if event != "succeeded":
                    raise BenchError(f"change {key} ended {event}: {fields.get(b'error_message', b'').decode()}")
                if key in finished:
                    raise BenchError(f"change {key} has two terminal events")
                finished[key] = int(entry_id.split(b"-")[0]) / 1000
            if len(page) < PAGE:
                break
            start = "(" + page[-1][0].decode()
        missing = wanted - finished.keys()
        if missing:
            raise BenchError(f"{len(missing)} changes have no terminal event, e.g. {sorted(missing)[:3]}")
        return finished
