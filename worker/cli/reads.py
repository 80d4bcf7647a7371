"""The read commands: ``results``, ``status``, ``dlq list``, ``dlq replay`` and ``stats``.

What they show is ``worker.core.readers``'s; here are the flags' rules and the output.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from worker.cli.common import EXIT_OK, emit, emit_object, load_settings, note, with_redis
from worker.core.change import DEFAULT_ACCOUNT
from worker.core.errors import BadFilter, NotFound, Refused

if TYPE_CHECKING:
    from worker.core.redis_connection import RedisClient
    from worker.core.settings import Settings

__all__ = ["run_dlq_list", "run_dlq_replay", "run_results", "run_stats", "run_status"]


def run_results(args: argparse.Namespace) -> int:
    import asyncio

    from worker.core import readers

    settings = load_settings()
    if args.group is not None:
        return _results_of_group(args, settings)
    if args.consumer is not None or args.start != "new":
        raise Refused("--consumer and --start need --group")

    async def show(client: RedisClient) -> None:
        async def stream() -> None:
            # Each blocking read ends well within the Redis timeout, so a hung Redis is still noticed.
            async for entry in readers.results(
                client,
                settings,
                idempotency_key=args.key,
                account=args.account,
                follow=args.follow,
                block_ms=max(1, int(settings.redis_timeout_s * 500)),
            ):
                emit(entry)

        await until_signalled(stream())

    from worker.core.processes import until_signalled

    asyncio.run(with_redis(settings, show))
    return EXIT_OK


def _results_of_group(args: argparse.Namespace, settings: Settings) -> int:
    """Every event through consumer group ``--group``, each acked once it is written (at least once)."""
    import asyncio
    import socket

    from producers.outcomes import ResultsConsumer
    from worker.core.processes import until_signalled

    if args.key is not None or args.account is not None:
        raise Refused("--key and --account cannot be used with --group (the group acks every event it reads)")
    consumer_name = args.consumer or f"{socket.gethostname()}-{os.getpid()}"

    async def show(client: RedisClient) -> None:
        consumer = ResultsConsumer(
            args.group,
            consumer_name,
            settings=settings,
            redis=client,
            start=args.start,
            claim_idle_s=args.claim_idle,
            follow=args.follow,
        )

        async def stream() -> None:
            async for event in consumer:
                emit({"id": event.id, **event.raw})
                await consumer.ack(event)

        await until_signalled(stream())

    asyncio.run(with_redis(settings, show))
    return EXIT_OK


def run_status(args: argparse.Namespace) -> int:
    import asyncio

    from worker.core import readers

    settings = load_settings()
    status = asyncio.run(
        with_redis(settings, lambda client: readers.change_status(client, settings, args.account, args.key))
    )
    if status is None:
        hours = settings.ledger_retention_s / 3600
        raise NotFound(
            f"no change with idempotency key {args.key!r} for account {args.account!r} "
            f"(never enqueued, or finished more than {hours:g} h ago)"
        )
    emit_object(status)
    return EXIT_OK


def run_dlq_list(args: argparse.Namespace) -> int:
    import asyncio

    from worker.core import readers

    settings = load_settings()

    async def show(client: RedisClient) -> None:
        async for entry in readers.dead_letters(client, settings, account=args.account):
            emit(entry)

    asyncio.run(with_redis(settings, show))
    return EXIT_OK


def run_dlq_replay(args: argparse.Namespace) -> int:
    import asyncio

    from worker.core import readers

    settings = load_settings()
    # --error-code and --since choose dead letters as --all does, only fewer of them.
    matching = args.all or args.error_code is not None or args.since is not None
    if bool(args.keys) == matching:
        raise Refused("give the idempotency keys to replay, or --all / --error-code / --since (not both)")
    if args.since is not None:
        try:
            readers.parse_duration(args.since)  # a bad duration is refused before Redis is asked anything
        except BadFilter as exc:
            raise BadFilter(f"--{exc}") from None  # its message names the filter "since": here it is a flag
    account = args.account if args.account is not None or matching else DEFAULT_ACCOUNT
    wanted = None if matching else set(args.keys)
    selection = readers.Selection(keys=wanted, account=account, error_code=args.error_code, since=args.since)

    async def replay(client: RedisClient) -> list[readers.ReplayOutcome]:
        # Read first, then replay: a replayed change that fails again must not be met again here.
        entries = [e async for e in readers.selected_dead_letters(client, settings, selection)]
        outcomes = []
        for entry in entries:
            outcome = await readers.replay(client, settings, entry)
            emit(outcome.as_dict())
            outcomes.append(outcome)
        return outcomes

    outcomes = asyncio.run(with_redis(settings, replay))
    queued = sum(1 for o in outcomes if o.status == "queued")
    if outcomes or matching:
        not_failed = len(outcomes) - queued
        note(f"replayed {queued} dead letter(s)" + (f", {not_failed} left alone (not failed)" if not_failed else ""))
    missing = sorted((wanted or set()) - {o.idempotency_key for o in outcomes})
    if missing:
        raise NotFound(
            f"no dead letter for idempotency key(s) {', '.join(repr(k) for k in missing)} of account {account!r}"
        )
    return EXIT_OK


def run_stats(args: argparse.Namespace) -> int:
    import asyncio

    from worker.core import readers

    settings = load_settings()
    emit_object(asyncio.run(with_redis(settings, lambda client: readers.stats(client, settings))))
    return EXIT_OK
