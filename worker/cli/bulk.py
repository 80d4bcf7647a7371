"""``leadstage enqueue --file``: a JSON Lines file (or stdin) enqueued all or nothing, streamed.

Two passes over the file in bounded memory: the first reads, validates and checks each line's key
(against the ledger and the lines before it) chunk by chunk, spooling the checked chunks; the
second writes the spooled chunks. Receipts go to stdout as each chunk is written, bad lines and a
summary to stderr, a progress line to a terminal's stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

import orjson

from worker.cli.common import EXIT_OK, EXIT_USAGE, emit, error_line, note, write_out
from worker.core.change import repeated_key, shown
from worker.core.errors import InvalidChange, Refused

if TYPE_CHECKING:
    from producers.library import LeadStageProducer
    from worker.core.ledger import Receipt
    from worker.core.settings import Settings

__all__ = ["enqueue_file"]

#: Bad lines of a file listed one by one before the rest are only counted.
LISTED_PROBLEMS = 100


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
    # The line's object is this pass's own: the envelope is taken out of it, the change is what is left.
    key, account, source = raw.pop("idempotency_key", None), raw.pop("account", None), raw.pop("source", None)
    if key is None and key_prefix is not None:
        key = f"{key_prefix}:{line}"
    return raw, key, account, source


def _not_json(text: bytes, error: orjson.JSONDecodeError) -> str:
    """Why a line is not a JSON value, in the file's terms (orjson speaks of a "str" for bad bytes)."""
    try:
        text.decode()
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text (byte {exc.start + 1} of the line is 0x{text[exc.start]:02x})"
    return f"not valid JSON ({error})"


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
        """The last progress line, ended; once (a later call writes nothing)."""
        if self.enabled and self._shown_at:
            self.update(force=True)
            sys.stderr.write("\n")
            self._shown_at = 0.0


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


async def enqueue_file(args: argparse.Namespace, settings: Settings) -> int:
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
            try:
                problems, first_bad = await _check_file(producer, file, args, progress, spool)
            except asyncio.CancelledError:  # SIGINT: asyncio.run cancels the command, then exits 130
                progress.done()
                error_line("interrupted while checking the file; nothing enqueued")
                raise
            if problems and not args.skip_invalid:
                progress.done()
                bad = ", ".join(map(str, first_bad)) + (", ..." if problems > len(first_bad) else "")
                error_line(
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
    note(f"{summary} in {time.monotonic() - started:.1f} s")
    return EXIT_OK


async def _check_file(
    producer: LeadStageProducer, file: IO[bytes], args: argparse.Namespace, progress: _Progress, spool: _Spool
) -> tuple[int, list[int]]:
    """The first pass: the number of invalid lines (each listed on stderr, up to a limit) and the
    first 20 of their numbers."""
    from producers.library import Validated, field_errors
    from worker.core.bulk import ENQUEUE_CHUNK
    from worker.core.errors import UnknownAccount

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
            note(f"line {number}: {shown(text, limit=300)}")
        elif problems == LISTED_PROBLEMS + 1:
            note("(more invalid lines are counted, not listed)")

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
            if text.isspace():
                continue
            try:
                raw = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                problem(number, _not_json(text, exc))
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
    from worker.core.bulk import Chunk, backlog_warning
    from worker.core.errors import EnqueueOutcomeUnknown, Interrupted, RedisNotReplicated

    counts = {"queued": 0, "duplicate": 0}
    #: The newest receipt of each account past the maximum age (what the warning names).
    past_max_age: dict[str, Receipt] = {}
    written: tuple[list[Receipt], list[int]] | None = None

    def emit_receipts(receipts: list[Receipt], lines: list[int]) -> None:
        out = []
        for receipt, line in zip(receipts, lines, strict=True):
            counts[receipt.status] += 1
            out.append(orjson.dumps({**receipt.as_dict(), "line": line}))
            if receipt.expected_wait_s > settings.max_age_s:
                past_max_age[receipt.account] = receipt
        write_out(b"\n".join(out) + b"\n")  # one write per chunk, not per line
        progress.enqueued += len(receipts)
        progress.update()

    async with producer.ledger.bulk_write() as write:
        for changes, lines in spool.chunks():
            chunk = Chunk(changes, [f"line {n}" for n in lines])
            try:
                await write.send(chunk)
                if written is not None:
                    emit_receipts(*written)  # the chunk before, while Redis writes this one
                    written = None
                written = (await write.receive(), lines)
            except (EnqueueOutcomeUnknown, RedisNotReplicated, asyncio.CancelledError) as exc:
                # What was written is told before the error: the chunk before (written), this one (unknown).
                if written is not None:
                    emit_receipts(*written)
                for (account, key), line in zip(chunk.envelopes(), lines, strict=True):
                    emit(
                        {"job_id": keys.job_id(account, key), "idempotency_key": key, "status": "unknown", "line": line}
                    )
                where = (
                    f"lines {lines[0]}..{lines[-1]} may or may not be enqueued (the receipts with status unknown), "
                    "the lines before them were enqueued, the lines after them were not"
                )
                if isinstance(exc, asyncio.CancelledError):  # SIGINT: asyncio.run cancels the command, then exits 130
                    progress.done()
                    error_line(f"interrupted; {where}")
                    raise
                raise Interrupted(f"{exc}; {where}") from None
    if written is not None:
        emit_receipts(*written)
    if warning := backlog_warning(list(past_max_age.values()), settings):
        note(f"warning: {warning}")
    return counts["queued"], counts["duplicate"]
