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
  errors) and a missing or bad setting in the environment. The split follows ``worker.core.errors``:
  ``PermanentError`` is 2, everything else 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, TypeVar

import orjson  # worker.core.change needs it anyway

# Only what every command needs is imported here; each command imports the rest itself, so that
# ``leadstage --help`` and a single enqueue start fast (redis-py, structlog and prometheus-client
# cost a few hundred ms of imports together).
from worker.core.change import DEFAULT_ACCOUNT, parse_id_text, repeated_key, shown
from worker.core.errors import FieldError, InvalidChange, LeadstageError, NotFound, PermanentError, Refused

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from producers.library import LeadStageProducer
    from worker.core.ledger import Receipt
    from worker.core.redis_connection import RedisClient
    from worker.core.settings import Settings

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

PROG = "leadstage"
#: The envelope fields a line of an enqueue file may carry beside the change.
LINE_ENVELOPE_FIELDS = ("idempotency_key", "account", "source")
#: The flag of each field of a change and its envelope, to name them in the user's terms.
FLAG_OF_FIELD = {
    "id": "--id",
    "name": "--name",
    "colour": "--colour",
    "applyTo": "--apply-to",
    "idempotency_key": "--key",
    "account": "--account",
    "source": "--source",
}
#: Bad lines of a file listed one by one before the rest are only counted.
LISTED_PROBLEMS = 100

_T = TypeVar("_T")
_Client = TypeVar("_Client", bound="RedisClient")

ENVIRONMENT_HELP = """environment (the settings that matter most; README lists them all):
  REDIS_URL                  redis://, rediss://, unix:// or redis+sentinel:// URL
                             (default redis://localhost:6379/0)
  IVVY_BASE_URL, IVVY_API_KEY, IVVY_API_SECRET
                             the iVvy account "default" (the worker needs an account)
  LEADSTAGE_ACCOUNTS_FILE    JSON file of accounts: name -> base_url, api_key, api_secret
  WEBHOOK_SECRET             whsec_... secret of the webhook's Standard Webhooks signatures
  LEADSTAGE_REDIS_TIMEOUT, LEADSTAGE_REDIS_CONNECT_TIMEOUT
                             seconds a Redis command / connection may take (default 5)
  LEADSTAGE_LOG_FORMAT       json, console or auto (console on a terminal)
"""

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
    # Messages may carry what the user gave (a key, a file name): no control character reaches the terminal.
    _note(f"{PROG}: error: {shown(text, limit=2000)}")


# -- running -----------------------------------------------------------------------------------


async def _with_redis(settings: Settings, use: Callable[[RedisClient], Awaitable[_T]]) -> _T:
    """``use`` a client of REDIS_URL: a single Redis or a Redis Cluster (the read commands)."""
    from worker.core.redis_connection import connect_redis_or_cluster_of

    return await _using(connect_redis_or_cluster_of(settings), use)


async def _with_single_redis(settings: Settings, use: Callable[[aioredis.Redis], Awaitable[_T]]) -> _T:
    """``use`` a client of a single Redis: what runs the enqueue script (a replay) refuses a cluster."""
    from worker.core.redis_connection import connect_redis_of

    return await _using(connect_redis_of(settings), use)


async def _using(client: _Client, use: Callable[[_Client], Awaitable[_T]]) -> _T:
    try:
        return await use(client)
    finally:
        await client.aclose()


def _settings() -> Settings:
    from worker.core.settings import Settings

    return Settings.from_env()


def _configure_logging(settings: Settings) -> None:
    from worker.core.logs import configure_logging

    configure_logging(settings)


# -- worker, webhook, fake-ivvy, demo ------------------------------------------------------------


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker.core.errors import redis_errors
    from worker.runner import run_worker

    settings = _settings()
    settings.require_accounts()
    _configure_logging(settings)
    with redis_errors():  # arq's own connection at start-up (Redis down, not Redis, a bad database)
        return run_worker(settings)


def _cmd_webhook(args: argparse.Namespace) -> int:
    from producers.webhook import run_webhook

    settings = _settings()
    _configure_logging(settings)
    return run_webhook(settings, args.host, args.port)


def _cmd_console(args: argparse.Namespace) -> int:
    from worker.console.app import run_console

    settings = _settings()
    _configure_logging(settings)
    return run_console(settings, args.host, args.port)


def _parse_fake_ivvy_options(options: list[str]) -> argparse.Namespace:
    # The fake's own options are parsed with its own parser, so that other commands need not import it.
    from worker.devtools import fake_ivvy

    parser = argparse.ArgumentParser(
        prog=f"{PROG} fake-ivvy", description=FAKE_IVVY_DESCRIPTION, formatter_class=_Formatter
    )
    fake_ivvy.add_arguments(parser)
    return parser.parse_args(options)


def _cmd_fake_ivvy(args: argparse.Namespace) -> int:
    from worker.devtools import fake_ivvy

    _configure_logging(_settings())
    return fake_ivvy.run_from_args(args.fake_options)


def _cmd_demo(args: argparse.Namespace) -> int:
    from worker.devtools.demo import run_demo  # configures its own logging (quieter, for a readable demo)

    return run_demo(_settings(), keep_running=args.keep_running)


# -- enqueue -----------------------------------------------------------------------------------


def _cmd_enqueue(args: argparse.Namespace) -> int:
    import asyncio

    from producers.library import LeadStageProducer

    fields = (("id", args.id), ("name", args.name), ("colour", args.colour), ("applyTo", args.apply_to))
    if args.file is not None:
        given = [FLAG_OF_FIELD[field] for field, value in fields if value is not None]
        if given:
            raise Refused(f"--file cannot be combined with {', '.join(given)}: each line of the file is a change")
        return asyncio.run(_enqueue_file(args, _settings()))
    if args.skip_invalid:
        raise Refused("--skip-invalid needs --file (it skips the invalid lines of a file)")
    settings = _settings()
    from worker.core import tracing

    tracing.continue_from_env()
    change: dict[str, object] = {field: value for field, value in fields if value is not None}
    id_errors: tuple[FieldError, ...] = ()
    if args.id is not None:
        try:
            change["id"] = parse_id_text(args.id)
        except InvalidChange as exc:
            id_errors, change["id"] = exc.errors, 1  # a stand-in, so that the other flags are checked too

    async def enqueue() -> Receipt:
        async with LeadStageProducer(settings, producer="cli", metrics=False) as producer:
            try:
                validated = producer.validate(
                    change, idempotency_key=args.key, account=args.account, source=args.source
                )
            except InvalidChange as exc:
                raise _in_flag_terms(InvalidChange([*id_errors, *exc.errors])) from None
            if id_errors:
                raise _in_flag_terms(InvalidChange(id_errors))
            (receipt,) = await producer.enqueue_validated([validated])
            return receipt

    from worker.core.ledger import backlog_warning

    receipt = asyncio.run(enqueue())
    _emit(receipt.as_dict())
    if warning := backlog_warning([receipt], settings):
        _note(f"warning: {warning}")
    return EXIT_OK


def _in_flag_terms(error: InvalidChange) -> Refused:
    """The errors of a change given as flags, naming the flags (--apply-to, not applyTo)."""
    from worker.core.change import UPDATABLE_FIELDS

    fields, flags = ", ".join(UPDATABLE_FIELDS), ", ".join(FLAG_OF_FIELD[f] for f in UPDATABLE_FIELDS)
    reasons = []
    for e in error.errors:
        reason = (
            e.reason.replace(fields, flags).replace("id is absent", "--id is absent").replace("(with id)", "(--id)")
        )
        reasons.append(f"{FLAG_OF_FIELD.get(e.field, e.field)}: {reason}")
    return Refused("invalid change: " + "; ".join(reasons))


def _open_input(path: str) -> tuple[IO[bytes], int | None]:
    """The file to read (stdin for -) and its size when known, for the progress line."""
    if path == "-":
        return sys.stdin.buffer, None
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed by the caller, after both passes
    except OSError as exc:
        raise Refused(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        size = os.fstat(file.fileno()).st_size
    except OSError:
        size = None
    return file, size


def _line_item(raw: object, line: int, key_prefix: str | None) -> tuple[object, Any, Any, Any]:
    """A JSONL line as (change, idempotency key, account, source), as given (validation checks their
    types); None means the default.

    Without its own key a line gets ``{--key}:{line}`` when --key is given (so running the same
    file again enqueues nothing twice), else a generated one.
    """
    if not isinstance(raw, dict):
        return raw, None, None, None
    change = {k: v for k, v in raw.items() if k not in LINE_ENVELOPE_FIELDS}
    key = raw.get("idempotency_key")
    if key is None and key_prefix is not None:
        key = f"{key_prefix}:{line}"
    return change, key, raw.get("account"), raw.get("source")


class _Progress:
    """One line on a terminal's stderr, rewritten at most every 0.2 s: bytes read, lines validated,
    changes enqueued. Nothing when stderr is not a terminal (a log file gets the summary only)."""

    def __init__(self, total_bytes: int | None) -> None:
        import time

        self._clock = time.monotonic
        self.enabled = sys.stderr.isatty()
        self.total = total_bytes
        self.read = self.lines = self.enqueued = 0
        self._shown_at = 0.0

    def update(self, *, force: bool = False) -> None:
        if not self.enabled or (not force and self._clock() - self._shown_at < 0.2):
            return
        self._shown_at = self._clock()
        read = f"{self.read / 1e6:.1f} MB" + (f" of {self.total / 1e6:.1f} MB" if self.total else "")
        sys.stderr.write(f"\r{read} read, {self.lines:,} lines validated, {self.enqueued:,} enqueued")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self._shown_at:
            self.update(force=True)
            sys.stderr.write("\n")


class _Spool:
    """The checked chunks of a file, kept for the second pass: in memory up to 2 MiB, then on disk,
    so that memory is bounded by the chunk size and stdin needs no second reading."""

    _HEADER = 8

    def __init__(self) -> None:
        import tempfile

        self.file = tempfile.SpooledTemporaryFile(max_size=2 * 2**20)  # noqa: SIM115 - closed by close()

    def add(self, changes: bytes, lines: list[int]) -> None:
        numbers = orjson.dumps(lines)
        self.file.write(len(changes).to_bytes(4, "little") + len(numbers).to_bytes(4, "little"))
        self.file.write(changes)
        self.file.write(numbers)

    def chunks(self) -> Iterator[tuple[bytes, list[int]]]:
        self.file.seek(0)
        while header := self.file.read(self._HEADER):
            changes = self.file.read(int.from_bytes(header[:4], "little"))
            yield changes, orjson.loads(self.file.read(int.from_bytes(header[4:], "little")))

    def close(self) -> None:
        self.file.close()


async def _enqueue_file(args: argparse.Namespace, settings: Settings) -> int:
    """Two passes, so that a file is enqueued all or nothing in bounded memory.

    The first reads and validates each line and checks its key (against the ledger and the lines
    before it) chunk by chunk, spooling the checked chunks; the second writes the spooled chunks.
    In each pass Redis works on one chunk while this process prepares the next (one connection,
    so the chunks are written in the file's order).
    """
    import time

    from producers.library import LeadStageProducer

    started = time.monotonic()
    file, size = _open_input(args.file)
    progress = _Progress(size)
    spool = _Spool()
    try:
        async with LeadStageProducer(settings, producer="cli", metrics=False) as producer:
            problems, first_bad = await _check_file(producer, file, args, progress, spool)
            if problems and not args.skip_invalid:
                progress.done()
                bad = ", ".join(map(str, first_bad)) + (", ..." if problems > len(first_bad) else "")
                _error_line(
                    f"{problems} invalid line(s) ({bad}); nothing enqueued (--skip-invalid enqueues the valid ones)"
                )
                return EXIT_USAGE
            receipts = await _write_spool(producer, spool, progress, settings)
    finally:
        progress.done()
        spool.close()
        if file is not sys.stdin.buffer:
            file.close()
    queued, duplicates = receipts
    summary = f"enqueued {queued + duplicates} change(s): {queued} queued, {duplicates} duplicate"
    if problems:
        summary += f", {problems} invalid line(s) skipped"
    _note(f"{summary} in {time.monotonic() - started:.1f} s")
    return EXIT_OK


async def _check_file(
    producer: LeadStageProducer, file: IO[bytes], args: argparse.Namespace, progress: _Progress, spool: _Spool
) -> tuple[int, list[int]]:
    """The first pass: the number of invalid lines (each listed on stderr, up to a limit) and the
    first 20 of their numbers."""
    from producers.library import Validated, field_errors
    from worker.core.errors import UnknownAccount
    from worker.core.ledger import ENQUEUE_CHUNK

    problems = 0
    first_bad: list[int] = []
    items: list[Validated] = []
    lines: list[int] = []

    def problem(number: int, text: str) -> None:
        nonlocal problems
        problems += 1
        if len(first_bad) < 20:
            first_bad.append(number)
        if problems <= LISTED_PROBLEMS:
            _note(f"line {number}: {shown(text, limit=300)}")
        elif problems == LISTED_PROBLEMS + 1:
            _note("(more invalid lines are counted, not listed)")

    async with producer.ledger.bulk_check() as check:

        async def send() -> None:
            nonlocal items, lines
            chunk = producer.ledger.chunk(items, [f"line {n}" for n in lines])
            spool.add(chunk.changes, lines)
            items, lines = [], []
            if check.busy:
                await check.receive()
            await check.send(chunk)  # Redis checks it while the next chunk is read

        for number, text in enumerate(file, start=1):
            progress.read += len(text)
            if not text.strip():
                continue
            try:
                raw = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                problem(number, f"not valid JSON ({exc})")
                continue
            repeated = repeated_key(text, raw)
            if repeated is not None:
                problem(number, f"repeats the key {shown(repeated)!r} (which one would count?)")
                continue
            change, key, account, source = _line_item(raw, number, args.key)
            try:
                validated = producer.validate(
                    change,
                    idempotency_key=key,
                    account=args.account if account is None else account,
                    source=args.source if source is None else source,
                )
            except (InvalidChange, UnknownAccount) as exc:
                problem(number, "; ".join(str(e) for e in field_errors(exc)))
                continue
            items.append(validated)
            lines.append(number)
            progress.lines += 1
            if len(items) == ENQUEUE_CHUNK:
                await send()
            progress.update()
        if items:
            await send()
        if check.busy:
            await check.receive()
    return problems, first_bad


async def _write_spool(
    producer: LeadStageProducer, spool: _Spool, progress: _Progress, settings: Settings
) -> tuple[int, int]:
    """The second pass: the receipts go to stdout as each chunk is written; returns (queued, duplicate).
    A warning follows when an account's backlog outlasts LEADSTAGE_MAX_AGE."""
    from worker.core import keys
    from worker.core.errors import EnqueueOutcomeUnknown, Interrupted, RedisNotReplicated
    from worker.core.ledger import Chunk, backlog_warning

    counts = {"queued": 0, "duplicate": 0}
    #: The newest receipt of each account past the maximum age (what the warning names).
    past_max_age: dict[str, Receipt] = {}
    written: tuple[list[Receipt], list[int]] | None = None

    def emit(receipts: list[Receipt], lines: list[int]) -> None:
        out = []
        for receipt, line in zip(receipts, lines, strict=True):
            counts[receipt.status] += 1
            out.append(orjson.dumps({**receipt.as_dict(), "line": line}))
            if receipt.expected_wait_s > settings.max_age_s:
                past_max_age[receipt.account] = receipt
        sys.stdout.buffer.write(b"\n".join(out) + b"\n")  # one write per chunk, not per line
        sys.stdout.flush()
        progress.enqueued += len(receipts)
        progress.update()

    async with producer.ledger.bulk_write() as write:
        for changes, lines in spool.chunks():
            chunk = Chunk(changes, [f"line {n}" for n in lines])
            try:
                await write.send(chunk)
                if written is not None:
                    emit(*written)  # the chunk before, while Redis writes this one
                    written = None
                written = (await write.receive(), lines)
            except (EnqueueOutcomeUnknown, RedisNotReplicated) as exc:
                if written is not None:
                    emit(*written)
                for (account, key), line in zip(chunk.envelopes(), lines, strict=True):
                    _emit(
                        {"job_id": keys.job_id(account, key), "idempotency_key": key, "status": "unknown", "line": line}
                    )
                raise Interrupted(
                    f"{exc}; lines {lines[0]}..{lines[-1]} may or may not be enqueued (the receipts with status "
                    f"unknown), the lines before them were enqueued, the lines after them were not"
                ) from None
    if written is not None:
        emit(*written)
    if warning := backlog_warning(list(past_max_age.values()), settings):
        _note(f"warning: {warning}")
    return counts["queued"], counts["duplicate"]


# -- results, status, dlq, stats ---------------------------------------------------------------


def _cmd_results(args: argparse.Namespace) -> int:
    import asyncio

    from worker.core import readers

    settings = _settings()
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
                _emit(entry)

        await until_signalled(stream())

    from worker.core.processes import until_signalled

    asyncio.run(_with_redis(settings, show))
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
    import asyncio

    from worker.core import readers

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
    import asyncio

    from worker.core import readers

    settings = _settings()

    async def show(client: RedisClient) -> None:
        async for entry in readers.dead_letters(client, settings, account=args.account):
            _emit(entry)

    asyncio.run(_with_redis(settings, show))
    return EXIT_OK


def _cmd_dlq_replay(args: argparse.Namespace) -> int:
    import asyncio

    from worker.core import readers

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

    outcomes = asyncio.run(_with_single_redis(settings, replay))
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
    import asyncio

    from worker.core import readers

    settings = _settings()
    _emit_object(asyncio.run(_with_redis(settings, lambda client: readers.stats(client, settings))))
    return EXIT_OK


# -- the parser --------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; an option shows its default when it has a telling one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or "default" in text or action.nargs == 0:
            return text
        return f"{text} (default: {default})"


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, not {shown(text)}")
    return int(text)


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
        "idempotency_key, account and source. Every line is validated and its key checked before\n"
        "anything is enqueued: bad lines are listed with their numbers and nothing is enqueued,\n"
        "unless --skip-invalid. Receipts (with their line number) go to stdout, a summary to\n"
        "stderr; on a terminal a progress line too. If Redis stops answering midway, the receipts\n"
        'say which lines were enqueued; lines with status "unknown" may or may not be: run the\n'
        "file again with the same keys (with --key, or keys in the lines) to be sure.",
    )
    change = parser.add_argument_group("the change (without --file)")
    change.add_argument("--id", help="the stage to update (absent: add a new stage)")
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
    webhook.add_argument("--port", type=_port, default=8080, help="port to listen on")

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
    console.add_argument("--port", type=_port, default=8090, help="port to listen on")

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
        epilog=ENVIRONMENT_HELP + ("\nexit status:" + __doc__.split("Exit status:", 1)[1] if __doc__ else ""),
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


def _redis_failure(exc: LeadstageError, *, written: bool) -> str:
    """What a Redis failure means for the user: where, which timeout, and whether anything was enqueued."""
    from worker.core.redis_connection import printable_url

    settings = _settings()
    where = f"REDIS_URL {printable_url(settings.redis_url)}"
    if type(exc.__cause__).__name__ == "TimeoutError":
        where += f", LEADSTAGE_REDIS_TIMEOUT {settings.redis_timeout_s:g} s"
    return f"{exc} ({where})" + ("" if written else "; nothing enqueued")


def main(argv: list[str] | None = None) -> int:
    """Run ``leadstage`` with ``argv`` (default: the process's arguments); returns the exit status."""
    args = parse_command(argv)
    from worker.core import tracing
    from worker.core.errors import EnqueueOutcomeUnknown, RedisUnavailable

    try:
        tracing.setup()
        status: int = args.run(args)
    except PermanentError as exc:
        _error_line(str(exc))
        return EXIT_USAGE
    except RedisUnavailable as exc:
        _error_line(_redis_failure(exc, written=isinstance(exc, EnqueueOutcomeUnknown) or args.command != "enqueue"))
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
