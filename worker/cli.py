"""``leadstage``: the one command of leadstage-sync (docs/contract.md: The command ``leadstage``).

Subcommands: worker, enqueue, results, status, dlq list / dlq replay, stats, webhook, fake-ivvy,
demo, console. ``build_parser()`` is the whole interface; ``main(argv)`` runs it and returns the exit
status, which ``python -m worker.cli`` and the console script pass to the shell.

Output: what a command produces goes to stdout as JSON (one line per change, receipt, result or
dead letter, so it pipes into jq or another program; a single object is indented on a terminal).
Progress, summaries and errors go to stderr. A failure is one line, ``leadstage: error: ...``,
never a traceback (a bulk enqueue lists its bad lines first, one per line).

Exit status:

* 0 - success;
* 1 - a failure that may pass on its own or is about the subject, not the input: Redis does not
  answer, the change or dead letter asked about is unknown, an unexpected error;
* 2 - bad input or a refusal, which only a change on the caller's side fixes: an invalid change
  or file line, an idempotency conflict, an unknown account, bad flags (argparse's own usage
  errors) and a missing or bad setting in the environment. The split follows ``worker.errors``:
  ``PermanentError`` is 2, everything else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from tqdm import tqdm

from producers.library import ChangeItem, LeadStageProducer, Validated, field_errors
from producers.outcomes import ResultsConsumer
from worker import readers, tracing
from worker.change import DEFAULT_ACCOUNT
from worker.errors import IdempotencyConflict, LeadstageError, NotFound, PermanentError, RedisUnavailable, Refused
from worker.ledger import Receipt, backlog_warning
from worker.logs import configure_logging
from worker.processes import until_signalled
from worker.redis_connection import connect_redis, printable_url
from worker.settings import Settings

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

PROG = "leadstage"
#: The envelope fields a line of an enqueue file may carry beside the change.
LINE_ENVELOPE_FIELDS = ("idempotency_key", "account", "source")

_T = TypeVar("_T")

FAKE_IVVY_DESCRIPTION = (
    "Serve a fake iVvy API (addOrUpdateLeadStage, getLeadStageList, ping) with signature checks,\n"
    "the seed's error codes and injectable faults, for the demo, tests and benchmarks."
)


# -- output ------------------------------------------------------------------------------------


def _emit(obj: object) -> None:
    """One JSON line on stdout, flushed (``results --follow`` is read as it is written)."""
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def _emit_object(obj: object) -> None:
    """One JSON object: indented for a person at a terminal, one line for a program."""
    if sys.stdout.isatty():
        sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")
        sys.stdout.flush()
    else:
        _emit(obj)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _error_line(text: str) -> None:
    _note(f"{PROG}: error: {text}")


# -- running -----------------------------------------------------------------------------------


async def _with_redis(settings: Settings, use: Callable[[aioredis.Redis], Awaitable[_T]]) -> _T:
    client = connect_redis(settings.redis_url)
    try:
        return await use(client)
    finally:
        await client.aclose()


def _settings() -> Settings:
    return Settings.from_env()


# -- worker, webhook, fake-ivvy, demo ------------------------------------------------------------


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker.runner import run_worker

    settings = _settings()
    settings.require_accounts()
    configure_logging(settings)
    return run_worker(settings)


def _cmd_webhook(args: argparse.Namespace) -> int:
    from producers.webhook import run_webhook

    settings = _settings()
    configure_logging(settings)
    return run_webhook(settings, args.host, args.port)


def _cmd_console(args: argparse.Namespace) -> int:
    from worker.console.app import run_console

    settings = _settings()
    configure_logging(settings)
    return run_console(settings, args.host, args.port)


def _parse_fake_ivvy_options(options: list[str]) -> argparse.Namespace:
    # The fake's own options are parsed with its own parser, so that other commands need not import it.
    from worker import fake_ivvy

    parser = argparse.ArgumentParser(
        prog=f"{PROG} fake-ivvy", description=FAKE_IVVY_DESCRIPTION, formatter_class=_Formatter
    )
    fake_ivvy.add_arguments(parser)
    return parser.parse_args(options)


def _cmd_fake_ivvy(args: argparse.Namespace) -> int:
    from worker import fake_ivvy

    configure_logging(_settings())
    return fake_ivvy.run_from_args(args.fake_options)


def _cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo  # configures its own logging (quieter, for a readable demo)

    return run_demo(_settings(), keep_running=args.keep_running)


# -- enqueue -----------------------------------------------------------------------------------


def _cmd_enqueue(args: argparse.Namespace) -> int:
    settings = _settings()
    tracing.continue_from_env()
    if args.file is not None:
        return asyncio.run(_enqueue_file(args, settings))
    change = {
        field: value
        for field, value in (("id", args.id), ("name", args.name), ("colour", args.colour), ("applyTo", args.apply_to))
        if value is not None
    }

    async def enqueue() -> Receipt:
        async with LeadStageProducer(settings, producer="cli") as producer:
            return await producer.enqueue(change, idempotency_key=args.key, account=args.account, source=args.source)

    receipt = asyncio.run(enqueue())
    _emit(receipt.as_dict())
    if warning := backlog_warning([receipt], settings):
        _note(f"warning: {warning}")
    return EXIT_OK


def _read_lines(path: str) -> list[bytes]:
    if path == "-":
        return sys.stdin.buffer.read().splitlines()
    try:
        with open(path, "rb") as file:
            return file.read().splitlines()
    except OSError as exc:
        raise Refused(f"cannot read {path}: {exc.strerror or exc}") from None


def _line_item(raw: object, line: int, key_prefix: str | None) -> ChangeItem:
    """A JSONL line: the change's fields, plus optional idempotency_key, account and source.

    Without its own key a line gets ``{--key}:{line}`` when --key is given (so running the same
    file again enqueues nothing twice), else a generated one.
    """
    if not isinstance(raw, dict):
        return ChangeItem(raw)
    change = {k: v for k, v in raw.items() if k not in LINE_ENVELOPE_FIELDS}
    key = raw.get("idempotency_key")
    if key is None and key_prefix is not None:
        key = f"{key_prefix}:{line}"
    return ChangeItem(change, idempotency_key=key, account=raw.get("account"), source=raw.get("source"))


async def _enqueue_file(args: argparse.Namespace, settings: Settings) -> int:
    started = time.monotonic()
    line_numbers: list[int] = []
    items: list[ChangeItem] = []
    problems: list[tuple[int, str]] = []
    for number, text in enumerate(_read_lines(args.file), start=1):
        if not text.strip():
            continue
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            problems.append((number, f"not valid JSON ({exc})"))
            continue
        line_numbers.append(number)
        items.append(_line_item(raw, number, args.key))

    async with LeadStageProducer(settings, producer="cli") as producer:
        valid, failures = producer.validate_many(items, account=args.account, source=args.source)
        for index, failure in failures:
            problems.append((line_numbers[index], "; ".join(str(e) for e in field_errors(failure))))
        problems.sort()
        for number, problem in problems:
            _note(f"line {number}: {problem}")
        if problems and not args.skip_invalid:
            bad = ", ".join(str(number) for number, _ in problems[:20]) + (", ..." if len(problems) > 20 else "")
            _error_line(
                f"{len(problems)} invalid line(s) ({bad}); nothing enqueued (--skip-invalid enqueues the valid ones)"
            )
            return EXIT_USAGE
        receipts = await _enqueue_with_progress(producer, [item for _, item in valid], valid, line_numbers)

    for (index, _), receipt in zip(valid, receipts, strict=True):
        _emit({**receipt.as_dict(), "line": line_numbers[index]})
    if warning := backlog_warning(receipts, settings):
        _note(f"warning: {warning}")
    duplicates = sum(1 for r in receipts if r.status == "duplicate")
    summary = f"enqueued {len(receipts)} change(s): {len(receipts) - duplicates} queued, {duplicates} duplicate"
    if problems:
        summary += f", {len(problems)} invalid line(s) skipped"
    _note(f"{summary} in {time.monotonic() - started:.1f} s")
    return EXIT_OK


async def _enqueue_with_progress(
    producer: LeadStageProducer,
    items: list[Validated],
    valid: list[tuple[int, Validated]],
    line_numbers: list[int],
) -> list[Receipt]:
    """Enqueue with a progress bar on a terminal; a conflict names its line."""
    with tqdm(total=len(items), unit="change", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        try:
            return await producer.enqueue_validated(items, progress=bar.update)
        except IdempotencyConflict as exc:
            lines = [
                line_numbers[index]
                for index, (_, envelope) in valid
                if (envelope.account, envelope.idempotency_key) == (exc.account, exc.idempotency_key)
            ]
            where = f"line {lines[-1]}: " if lines else ""
            raise Refused(f"{where}{exc}; nothing enqueued") from None


# -- results, status, dlq, stats ---------------------------------------------------------------


def _cmd_results(args: argparse.Namespace) -> int:
    settings = _settings()
    if args.group is not None:
        return _results_of_group(args, settings)
    if args.consumer is not None or args.start != "new":
        raise Refused("--consumer and --start need --group")

    async def show(client: aioredis.Redis) -> None:
        async def stream() -> None:
            async for entry in readers.results(
                client, settings, idempotency_key=args.key, account=args.account, follow=args.follow
            ):
                _emit(entry)

        await until_signalled(stream())

    asyncio.run(_with_redis(settings, show))
    return EXIT_OK


def _results_of_group(args: argparse.Namespace, settings: Settings) -> int:
    """Every event through consumer group ``--group``, each acked once it is written (at least once)."""
    if args.key is not None or args.account is not None:
        raise Refused("--key and --account cannot be used with --group (the group acks every event it reads)")
    consumer_name = args.consumer or f"{socket.gethostname()}-{os.getpid()}"

    async def show(client: aioredis.Redis) -> None:
        consumer = ResultsConsumer(
            args.group, consumer_name, settings=settings, redis=client, start=args.start,
            claim_idle_s=args.claim_idle, follow=args.follow,
        )  # fmt: skip

        async def stream() -> None:
            async for event in consumer:
                _emit({"id": event.id, **event.raw})
                await consumer.ack(event)

        await until_signalled(stream())

    asyncio.run(_with_redis(settings, show))
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    settings = _settings()
    status = asyncio.run(
        _with_redis(settings, lambda client: readers.change_status(client, settings, args.account, args.key))
    )
    if status is None:
        hours = settings.ledger_retention_s / 3600
        raise NotFound(
            f"no change with idempotency key {args.key!r} for account {args.account!r} "
            f"(never enqueued, or finished more than {hours:g} h ago)"
        )
    _emit_object(status)
    return EXIT_OK


def _cmd_dlq_list(args: argparse.Namespace) -> int:
    settings = _settings()

    async def show(client: aioredis.Redis) -> None:
        async for entry in readers.dead_letters(client, settings, account=args.account):
            _emit(entry)

    asyncio.run(_with_redis(settings, show))
    return EXIT_OK


def _cmd_dlq_replay(args: argparse.Namespace) -> int:
    settings = _settings()
    # --error-code and --since choose dead letters as --all does, only fewer of them.
    matching = args.all or args.error_code is not None or args.since is not None
    if bool(args.keys) == matching:
        raise Refused("give the idempotency keys to replay, or --all / --error-code / --since (not both)")
    if args.since is not None:
        readers.parse_duration(args.since)  # a bad duration is refused before Redis is asked anything
    account = args.account if args.account is not None or matching else DEFAULT_ACCOUNT
    wanted = None if matching else set(args.keys)

    async def replay(client: aioredis.Redis) -> list[readers.ReplayOutcome]:
        # Read first, then replay: a replayed change that fails again must not be met again here.
        entries = [
            e
            async for e in readers.dead_letters(
                client,
                settings,
                account=account,
                idempotency_keys=wanted,
                error_code=args.error_code,
                since_ms=await readers.since_as_ms(client, args.since),
            )
        ]
        outcomes = []
        for entry in entries:
            outcome = await readers.replay(client, settings, entry)
            _emit(outcome.as_dict())
            outcomes.append(outcome)
        return outcomes

    outcomes = asyncio.run(_with_redis(settings, replay))
    queued = sum(1 for o in outcomes if o.status == "queued")
    if outcomes or matching:
        not_failed = len(outcomes) - queued
        _note(f"replayed {queued} dead letter(s)" + (f", {not_failed} left alone (not failed)" if not_failed else ""))
    missing = sorted((wanted or set()) - {o.idempotency_key for o in outcomes})
    if missing:
        raise NotFound(
            f"no dead letter for idempotency key(s) {', '.join(repr(k) for k in missing)} of account {account!r}"
        )
    return EXIT_OK


def _cmd_stats(args: argparse.Namespace) -> int:
    settings = _settings()
    _emit_object(asyncio.run(_with_redis(settings, lambda client: readers.stats(client, settings))))
    return EXIT_OK


# -- the parser --------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their line breaks; options show their defaults."""


def _subparser(
    subparsers: Any, name: str, run: Callable[[argparse.Namespace], int] | None, summary: str, description: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=summary, description=description, formatter_class=_Formatter
    )
    if run is not None:
        parser.set_defaults(run=run)
    return parser


def _add_enqueue(subparsers: Any) -> None:
    parser = _subparser(
        subparsers,
        "enqueue",
        _cmd_enqueue,
        "enqueue one change, or a file of them",
        "Enqueue one lead-stage change from flags, or many from a JSON Lines file.\n\n"
        "An add needs --name and --apply-to; an update needs --id and at least one field to change.\n"
        'Prints one JSON line per change: {"job_id", "idempotency_key", "status": "queued"|"duplicate"}.\n\n'
        "--file F.jsonl (- for stdin): one change per line, as JSON, optionally with its own\n"
        "idempotency_key, account and source. Every line is validated before anything is enqueued;\n"
        "bad lines are listed with their numbers and nothing is enqueued, unless --skip-invalid.\n"
        "Receipts (with their line number) go to stdout, a summary to stderr.",
    )
    change = parser.add_argument_group("the change (without --file)")
    change.add_argument("--id", type=int, help="the stage to update (absent: add a new stage)")
    change.add_argument("--name", help="stage name, 1..255 characters")
    change.add_argument("--apply-to", metavar="{lead,opportunity,1,2}", help="what the stage applies to")
    change.add_argument("--colour", "--color", dest="colour", metavar="#RRGGBB", help="stage colour")
    parser.add_argument(
        "--key",
        help="idempotency key (generated if absent); with --file, lines without their own key get KEY:LINE",
    )
    parser.add_argument("--account", default=DEFAULT_ACCOUNT, help="iVvy account (per line: the line's own wins)")
    parser.add_argument("--source", default="cli", help="free text recorded with the change")
    bulk = parser.add_argument_group("bulk")
    bulk.add_argument("--file", metavar="F.jsonl", help="enqueue every line of this file (- for stdin)")
    bulk.add_argument("--skip-invalid", action="store_true", help="with --file: enqueue the valid lines anyway")


def _add_readers(subparsers: Any) -> None:
    results = _subparser(
        subparsers,
        "results",
        _cmd_results,
        "print the results stream",
        'Print the results stream as JSON lines, oldest first (each entry\'s stream id as "id").\n'
        "--follow keeps printing new entries as they arrive, until SIGINT or SIGTERM.\n\n"
        "--group G reads through the Redis consumer group G instead: each entry is printed, then\n"
        "acknowledged, so a consumer that stops resumes where it was (at least once: an entry printed\n"
        "just before a crash is printed again). Entries another consumer of G left unacknowledged for\n"
        "--claim-idle seconds are taken over. --start places a new group: new (from now), all (the\n"
        "whole stream) or a stream id (the entries after it); an existing group keeps its place.",
    )
    results.add_argument("--follow", "-f", action="store_true", help="wait for new results")
    results.add_argument("--key", help="only the results of this idempotency key")
    results.add_argument("--account", help="only the results of this account")
    group = results.add_argument_group("consumer group")
    group.add_argument("--group", "-g", metavar="G", help="read through consumer group G (created if new)")
    group.add_argument("--consumer", metavar="C", help="this consumer's name in G, HOST-PID when absent")
    group.add_argument("--start", metavar="{new,all,ID}", default="new", help="where a new group starts")
    group.add_argument(
        "--claim-idle", type=float, default=60.0, metavar="S", help="take over entries unacked this long"
    )

    status = _subparser(
        subparsers,
        "status",
        _cmd_status,
        "show where one change stands",
        "Show one change from the ledger: state (queued, running, retrying, succeeded, failed,\n"
        "superseded), stage id, attempts and the history of each attempt. Exit status 1 when the\n"
        "key is unknown (never enqueued, or finished before the ledger retention).",
    )
    status.add_argument("key", metavar="KEY", help="the idempotency key")
    status.add_argument("--account", default=DEFAULT_ACCOUNT, help="the account the change was enqueued for")

    dlq = _subparser(
        subparsers,
        "dlq",
        None,
        "list or replay dead letters",
        "Dead letters: changes that failed for good, with everything needed to replay them.",
    )
    dlq_commands = dlq.add_subparsers(dest="dlq_command", metavar="{list,replay}", required=True)
    listing = _subparser(
        dlq_commands, "list", _cmd_dlq_list, "print dead letters", "Print the dead letters as JSON lines, oldest first."
    )
    listing.add_argument("--account", help="only this account's dead letters")
    replay = _subparser(
        dlq_commands,
        "replay",
        _cmd_dlq_replay,
        "put dead letters back on the queue",
        "Enqueue dead-lettered changes again under their own idempotency keys (a new generation)\n"
        "and remove their dead letters. Prints one JSON line per replayed change; exit status 1 if\n"
        "a KEY has no dead letter.",
    )
    replay.add_argument("keys", nargs="*", metavar="KEY", help="idempotency keys to replay")
    replay.add_argument("--all", action="store_true", help="replay every dead letter (of --account, if given)")
    replay.add_argument("--account", help=f"the account of the keys (default {DEFAULT_ACCOUNT}; with --all: every)")
    replay.add_argument(
        "--error-code", metavar="C", help="replay the dead letters with this error code (e.g. 24320, timeout)"
    )
    replay.add_argument(
        "--since", metavar="DURATION", help="replay the dead letters of the last DURATION (90s, 15m, 2h, 7d)"
    )

    _subparser(
        subparsers,
        "stats",
        _cmd_stats,
        "show queue depth, in progress, retrying, dead letters, recent rates",
        "Show the queue at a glance, as JSON: queue depth, waiting, in progress, retrying (deferred\n"
        "to a later attempt), dead letters, results, and the events per outcome of the last minute\n"
        "and five minutes with the terminal events per second.",
    )


def _add_services(subparsers: Any) -> None:
    _subparser(
        subparsers,
        "worker",
        _cmd_worker,
        "run a worker",
        "Run an arq worker that applies queued changes to iVvy (needs IVVY_BASE_URL, IVVY_API_KEY,\n"
        "IVVY_API_SECRET or LEADSTAGE_ACCOUNTS_FILE). SIGTERM finishes the requests in flight, then exits.",
    )
    webhook = _subparser(
        subparsers,
        "webhook",
        _cmd_webhook,
        "run the HTTP producer",
        "Serve POST /v1/lead-stage-changes (Standard Webhooks signed with WEBHOOK_SECRET), /healthz,\n"
        "/readyz, /metrics and /openapi.json, until SIGINT or SIGTERM.",
    )
    webhook.add_argument("--host", default="0.0.0.0", help="address to listen on")  # noqa: S104 - webhooks come from other hosts
    webhook.add_argument("--port", type=int, default=8080, help="port to listen on")

    fake: argparse.ArgumentParser = subparsers.add_parser(
        "fake-ivvy", help="run a local iVvy stand-in", description=FAKE_IVVY_DESCRIPTION, add_help=False
    )
    # Its options (and --help) are left unparsed here and handed to the fake's own parser.
    fake.set_defaults(run=_cmd_fake_ivvy, passes_options=True)

    console = _subparser(
        subparsers,
        "console",
        _cmd_console,
        "run the operations console",
        "Serve the operations console (Overview, Failures, a change's timeline) and its JSON API\n"
        "under /api/v1/ (OpenAPI at /api/v1/openapi.json), until SIGINT or SIGTERM. Needs\n"
        "LEADSTAGE_CONSOLE_TOKEN (LEADSTAGE_CONSOLE_READ_TOKEN may read only). Warns when listening\n"
        "beyond loopback unless LEADSTAGE_CONSOLE_TLS_PROXY=1 declares a TLS proxy in front.",
    )
    console.add_argument("--host", default="127.0.0.1", help="address to listen on")
    console.add_argument("--port", type=int, default=8090, help="port to listen on")

    demo = _subparser(
        subparsers,
        "demo",
        _cmd_demo,
        "run the demo end to end",
        "Run a fake iVvy, a worker and sample changes against REDIS_URL (or a redis-server of its\n"
        "own when nothing answers there), print the results, then exit: 0 when every sample ended\n"
        "as expected, 1 otherwise.",
    )
    demo.add_argument(
        "--keep-running", action="store_true", help="keep the fake iVvy and the worker up after the summary"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``leadstage`` command line."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Apply lead-stage changes to the iVvy CRM API from a Redis queue.",
        epilog="exit status:" + __doc__.split("Exit status:", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_services(subparsers)
    _add_enqueue(subparsers)
    _add_readers(subparsers)
    return parser


def parse_command(argv: list[str] | None = None) -> argparse.Namespace:
    """``argv`` parsed as ``leadstage`` parses it (exits 2 on bad flags), fake-ivvy's options included."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passes_options", False):
        args.fake_options = _parse_fake_ivvy_options(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run ``leadstage`` with ``argv`` (default: the process's arguments); returns the exit status."""
    args = parse_command(argv)
    try:
        tracing.setup()
        status: int = args.run(args)
    except PermanentError as exc:
        _error_line(str(exc))
        return EXIT_USAGE
    except RedisUnavailable as exc:
        _error_line(f"{exc} (REDIS_URL {printable_url(_settings().redis_url)})")
        return EXIT_FAILURE
    except LeadstageError as exc:
        _error_line(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``leadstage results | head``): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback, as for every failure
        _error_line(f"unexpected {type(exc).__name__}: {exc}")
        return EXIT_FAILURE
    return status


if __name__ == "__main__":
    raise SystemExit(main())
