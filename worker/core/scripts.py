"""The ledger's scripts, loaded once per client, and how each is called: EVALSHA, with ``WAIT`` for
replicas on the same connection and the schedule's notice in the same round trip when asked.

Every transition of a change is one of these scripts (worker/core/lua/: their KEYS, ARGV and
reply at the top of each); their replies are parsed by ``worker.core.replies``. Every time that
decides anything is the Redis server's clock (``TIME`` inside the scripts, once per call).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.typing import EncodableT

from worker.core import keys
from worker.core.errors import RedisNotReplicated, redis_errors, script_missing
from worker.core.settings import Settings

#: How far ahead of the server's clock a rate-limit slot may be taken in a claim (µs): at high rates
#: the slots due within it go in one call; at rates below 1,000/s it changes nothing.
RATE_WINDOW_US = 1000


def now_ms() -> int:
    """This host's clock, for what is only reported (event times, durations), never decided."""
    return int(time.time() * 1000)


def _script(client: aioredis.Redis, name: str) -> AsyncScript:
    return client.register_script(resources.files("worker.core").joinpath("lua", name).read_text())


class Scripts:
    """The scripts over one shared client, and the settings their arguments come from."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._enqueue = _script(client, "enqueue.lua")
        self._ready = _script(client, "ready.lua")
        queue = settings.queue_name
        self._ready_keys = [keys.ready_key(queue), keys.wake_key(queue), keys.epoch_key(queue)]
        self._start = _script(client, "start.lua")
        self._lease = _script(client, "lease.lua")
        self._post = _script(client, "post.lua")
        self._adopt = _script(client, "adopt.lua")
        self._finish = _script(client, "finish.lua")
        self._lost = _script(client, "lost.lua")

    async def _call(
        self,
        script: AsyncScript,
        keys_: Sequence[str],
        args: Sequence[EncodableT],
        *,
        confirm: bool,
        notify: Sequence[str] = (),
    ) -> tuple[Any, int | None]:
        """Run a script; with ``LEADSTAGE_REDIS_MIN_REPLICAS`` and ``confirm``, followed by ``WAIT`` on
        the same connection (WAIT counts the replicas that have this connection's writes), and then
        by the schedule's notice for the accounts in ``notify``, in one round trip. Returns the
        script's reply and how many replicas confirmed (None: not asked)."""
        settings = self.settings
        wait = confirm and settings.redis_min_replicas > 0
        with redis_errors():
            if not wait and not notify:
                return await script(keys=keys_, args=args), None
            for _ in range(2):
                # EVALSHA by hand: a pipeline of Script objects asks SCRIPT EXISTS first, a round trip more.
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.evalsha(script.sha, len(keys_), *keys_, *args)  # type: ignore[arg-type]  # redis-py types ARGV as str only
                    if wait:
                        pipe.execute_command(
                            "WAIT", settings.redis_min_replicas, int(settings.redis_replica_timeout_s * 1000)
                        )
                    if notify:
                        pipe.evalsha(self._ready.sha, 3, *self._ready_keys, "notify", "", *sorted(set(notify)))
                    replies = await pipe.execute(raise_on_error=False)
                missing = [r for r in replies if script_missing(r)]
                if not missing:
                    break
                # A Redis that restarted or flushed its scripts: load them, then once more.
                await self.client.script_load(script.script)
                await self.client.script_load(self._ready.script)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies[0], int(replies[1]) if wait else None

    def _require_replicas(self, acked: int | None, what: str) -> None:
        """``RedisNotReplicated`` when fewer replicas than required confirmed ``what``."""
        settings = self.settings
        if acked is not None and acked < settings.redis_min_replicas:
            raise RedisNotReplicated(what, acked, settings.redis_min_replicas, settings.redis_replica_timeout_s)

    # -- the worker ----------------------------------------------------------------------------
    async def notify(self, accounts: Iterable[str], at_ms: int | None = None) -> None:
        """Tell the schedule that these accounts have work from ``at_ms`` (server ms; None: now), and
        wake an idle worker when that is sooner than anything scheduled (ready.lua)."""
        names = sorted(set(accounts))
        if not names:
            return
        with redis_errors():
            await self._ready(keys=self._ready_keys, args=["notify", "" if at_ms is None else at_ms, *names])

    @property
    def lease_ms(self) -> int:
        """How long a started job stays hidden from other workers without a heartbeat."""
        return int(self.settings.lease_s * 1000)

    @property
    def in_flight_guard_ms(self) -> int:
        """How long after its recovery point a POST may still be in flight (a crashed worker's): the
        request timeout, and a second for the round trip that wrote the recovery point."""
        return int(self.settings.request_timeout_s * 1000) + 1000

    @property
    def late_commit_ms(self) -> int:
        """How long after an unknown outcome iVvy may still apply the request: the stage stays locked
        for that long whatever becomes of the change."""
        return int(self.settings.request_timeout_s * 1000)

    @property
    def lock_ms(self) -> int:
        """Long enough for a reconciling list and a POST, each up to the request timeout."""
        return int(self.settings.request_timeout_s * 2000) + 5000
