"""The ledger's scripts, loaded once per client, and how each is called: EVALSHA, with ``WAIT`` for
replicas on the same connection and the schedule's notice in the same round trip when asked.

Every transition of a change is one of these scripts (worker/core/lua/: their KEYS, ARGV and
reply at the top of each); their replies are parsed by ``worker.core.replies``. Every time that
decides anything is the Redis server's clock (``TIME`` inside the scripts, once per call).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from worker.core import keys
from worker.core.errors import RedisNotReplicated, redis_errors, reply_or_error, script_missing
from worker.core.settings import Settings

if TYPE_CHECKING:  # redis-py at run time only with a client: the one-shot enqueue uses this module without it
    from redis.commands.core import AsyncScript
    from redis.typing import EncodableT

    from worker.core.redis_connection import RedisClient

#: How far ahead of the server's clock a rate-limit slot may be taken in a claim (µs): at high rates
#: the slots due within it go in one call; at rates below 1,000/s it changes nothing.
RATE_WINDOW_US = 1000


def now_ms() -> int:
    """This host's clock, for what is only reported (event times, durations), never decided."""
    return int(time.time() * 1000)


#: A line of a script that stands for another file of worker/core/lua/ (``script_source``).
_INCLUDE = re.compile(r"^--#include (\S+)$", re.MULTILINE)


def script_source(name: str) -> str:
    """The Lua source of a script of worker/core/lua/, each ``--#include NAME`` line replaced by that
    file (helpers several scripts share: a script sent to Redis is one text)."""
    source = (Path(__file__).parent / "lua" / name).read_text()
    return _INCLUDE.sub(lambda line: script_source(line[1]), source)


def _script(client: RedisClient, name: str) -> AsyncScript:
    """A script of worker/core/lua/ over ``client``, a single Redis's or a cluster's (EVALSHA, loaded on NOSCRIPT)."""
    return client.register_script(script_source(name))  # type: ignore[misc]  # redis-py's stubs type it for Redis only


#: How much wider than its rate limit asks an account's sends are spaced. A server that counts
#: requests over a sliding second (as iVvy's limit does) sees them arrive with the jitter of the
#: worker's timer, its loop and the network: spaced at exactly the limit, one arrival later than the
#: next ones puts one request too many in a second (a 429, and a pause of the whole account).
#: 2 % leaves about 20 ms a second for that jitter and sends at 98 % of the limit.
RATE_HEADROOM = 0.02


def rate_interval_us(rate_limit: float) -> int:
    """The account's rate limit as the GCRA's interval between two sends (µs), as the scripts take it
    (``RATE_HEADROOM`` wider)."""
    return max(1, round(1_000_000 * (1 + RATE_HEADROOM) / rate_limit))


#: A script as a pipeline calls it: redis-py's (its ``sha`` and ``script``), or the one-shot enqueue's.
_Script = TypeVar("_Script")
#: One command of a pipeline, with the script it calls (None: not a script).
Part: TypeAlias = "tuple[AsyncScript | None, tuple[EncodableT, ...]]"


def evalsha(script: AsyncScript, keys_: Sequence[EncodableT], args: Sequence[EncodableT]) -> Part:
    """A call of ``script`` by its digest, for a pipeline."""
    return script, ("EVALSHA", script.sha, len(keys_), *keys_, *args)


def ready_keys(queue_name: str) -> list[str]:
    """ready.lua's keys: the schedule of accounts, the wake-up list, the epoch."""
    return [keys.ready_key(queue_name), keys.wake_key(queue_name), keys.epoch_key(queue_name)]


def notice_args(accounts: Iterable[str], at_ms: int | None = None) -> list[str | int]:
    """ready.lua's arguments telling the schedule that these accounts have work from ``at_ms``
    (server ms; None: now)."""
    return ["notify", "" if at_ms is None else at_ms, *sorted(set(accounts))]


def round_trip(
    call: tuple[_Script, tuple[Any, ...]],
    settings: Settings,
    *,
    confirm: bool,
    notice: tuple[_Script, tuple[Any, ...]] | None,
) -> list[tuple[_Script | None, tuple[Any, ...]]]:
    """A script's ``call`` as one round trip on one connection: with ``LEADSTAGE_REDIS_MIN_REPLICAS``
    and ``confirm``, ``WAIT`` after it (WAIT counts the replicas that have this connection's
    writes); then the schedule's ``notice`` (ready.lua), if any."""
    parts: list[tuple[_Script | None, tuple[Any, ...]]] = [call]
    if confirm and settings.redis_min_replicas > 0:
        parts.append((None, ("WAIT", settings.redis_min_replicas, int(settings.redis_replica_timeout_s * 1000))))
    if notice is not None:
        parts.append(notice)
    return parts


def not_run(parts: Sequence[tuple[_Script | None, object]], replies: Sequence[Any]) -> tuple[list[_Script], list[int]]:
    """After a pipeline of ``parts``: the scripts Redis did not have (NOSCRIPT), and the parts to send
    again once they are loaded: those that did not run, and a WAIT after one that is sent again. A
    part that ran is never sent twice (a second enqueue.lua would call its own change a duplicate)."""
    missing = [i for i, reply in enumerate(replies) if script_missing(reply)]
    again = [
        i for i, (script, _) in enumerate(parts) if i in missing or (script is None and any(j < i for j in missing))
    ]
    return [script for script in {parts[i][0] for i in missing} if script is not None], again


def require_replicas(settings: Settings, acked: int | None, what: str) -> None:
    """``RedisNotReplicated`` when fewer replicas than required confirmed ``what`` (None: not asked)."""
    if acked is not None and acked < settings.redis_min_replicas:
        raise RedisNotReplicated(what, acked, settings.redis_min_replicas, settings.redis_replica_timeout_s)


class Scripts:
    """The scripts over one shared client, and the settings their arguments come from.

    On a Redis Cluster (``cluster``) each call names keys of one slot; a call confirmed by ``WAIT``
    goes on a connection of that slot's master, and the schedule's notice (another slot) follows it.
    """

    def __init__(self, client: RedisClient, settings: Settings) -> None:
        from redis.asyncio.cluster import RedisCluster

        self.client = client
        self.settings = settings
        self.cluster = isinstance(client, RedisCluster)
        self._enqueue = _script(client, "enqueue.lua")
        self._ready = _script(client, "ready.lua")
        self._ready_keys = ready_keys(settings.queue_name)
        self._start = _script(client, "start.lua")
        self._lease = _script(client, "lease.lua")
        self._post = _script(client, "post.lua")
        self._adopt = _script(client, "adopt.lua")
        self._finish = _script(client, "finish.lua")
        self._lost = _script(client, "lost.lua")
        self._ack = _script(client, "ack.lua")
        self._gather = _script(client, "gather.lua")
        self._batch = _script(client, "batch.lua")

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
        wait = confirm and self.settings.redis_min_replicas > 0
        if self.cluster and notify:  # the schedule is another slot's: its notice follows the call
            reply = await self._call(script, keys_, args, confirm=confirm)
            await self.notify(notify)
            return reply
        with redis_errors():
            if not wait and not notify:
                return await script(keys=keys_, args=args), None
            # EVALSHA by hand: a pipeline of Script objects asks SCRIPT EXISTS first, a round trip more.
            notice = evalsha(self._ready, self._ready_keys, notice_args(notify)) if notify else None
            parts = round_trip(evalsha(script, keys_, args), self.settings, confirm=confirm, notice=notice)
            replies = await self._send([command for _, command in parts], keys_[0])
            missing, again = not_run(parts, replies)
            if again:
                # A Redis that restarted or flushed its scripts: load them, send again only what did not run.
                for loaded in missing:
                    await self.client.script_load(loaded.script)
                for i, reply in zip(again, await self._send([parts[i][1] for i in again], keys_[0]), strict=True):
                    replies[i] = reply
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies[0], int(replies[1]) if wait else None

    async def _send(self, commands: Sequence[tuple[EncodableT, ...]], key: str) -> list[Any]:
        """These commands in one round trip, on one connection (on a cluster, one of ``key``'s
        master's); errors are replies, not raised."""
        if not self.cluster:
            async with self.client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies
        from worker.core.redis_connection import acquire_connection

        connection, release = await acquire_connection(self.client, key)
        read = False
        try:
            await connection.send_packed_command(connection.pack_commands(commands))
            replies = [await reply_or_error(connection) for _ in commands]
            read = True
        finally:
            if not read:  # answers nobody will read: the connection cannot be used again
                await connection.disconnect()
            await release()
        return replies

    def _require_replicas(self, acked: int | None, what: str) -> None:
        """``RedisNotReplicated`` when fewer replicas than required confirmed ``what``."""
        require_replicas(self.settings, acked, what)

    # -- the worker ----------------------------------------------------------------------------
    async def notify(self, accounts: Iterable[str], at_ms: int | None = None) -> None:
        """Tell the schedule that these accounts have work from ``at_ms`` (server ms; None: now), and
        wake an idle worker when that is sooner than anything scheduled (ready.lua)."""
        names = sorted(set(accounts))
        if not names:
            return
        with redis_errors():
            await self._ready(keys=self._ready_keys, args=notice_args(names, at_ms))

    @property
    def lease_ms(self) -> int:
        """How long a started job stays hidden from other workers without a heartbeat."""
        return int(self.settings.lease_s * 1000)

    @property
    def in_flight_guard_ms(self) -> int:
        """How long after its recovery point a POST may still be in flight (a crashed worker's): the
        request timeout, and ``LEADSTAGE_IN_FLIGHT_MARGIN`` (1 s) for the round trip that wrote the
        recovery point."""
        return int(self.settings.request_timeout_s * 1000) + int(self.settings.in_flight_margin_s * 1000)

    @property
    def late_commit_ms(self) -> int:
        """How long after an unknown outcome iVvy may still apply the request: the stage stays locked
        for that long whatever becomes of the change."""
        return int(self.settings.request_timeout_s * 1000)

    @property
    def lock_ms(self) -> int:
        """Long enough for a reconciling list and a POST, each up to the request timeout."""
        return int(self.settings.request_timeout_s * 2000) + 5000
