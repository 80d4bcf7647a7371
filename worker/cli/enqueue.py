"""``leadstage enqueue``: one change from flags (here), or a file of them (``worker.cli.bulk``).

A single enqueue imports only the change model, the settings and ``worker.core.one_shot``
(neither redis-py nor asyncio, unless REDIS_URL is a Sentinel's or a cluster's): it is what a
shell loop runs once per change, so its start-up is most of its cost.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from worker.cli.common import EXIT_OK, emit, load_settings, note
from worker.core.change import parse_id_text
from worker.core.errors import FieldError, InvalidChange, Refused

if TYPE_CHECKING:
    from worker.core.change import Envelope, LeadStageChange
    from worker.core.ledger import Receipt
    from worker.core.settings import Settings

__all__ = ["FLAG_OF_FIELD", "run_enqueue"]

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


def run_enqueue(args: argparse.Namespace) -> int:
    """One change from the flags, or every line of ``--file``."""
    fields = (("id", args.id), ("name", args.name), ("colour", args.colour), ("applyTo", args.apply_to))
    if args.file is not None:
        given = [FLAG_OF_FIELD[field] for field, value in fields if value is not None]
        if given:
            raise Refused(f"--file cannot be combined with {', '.join(given)}: each line of the file is a change")
        import asyncio

        from worker.cli.bulk import enqueue_file

        return asyncio.run(enqueue_file(args, load_settings()))
    if args.skip_invalid:
        raise Refused("--skip-invalid needs --file (it skips the invalid lines of a file)")
    from worker.core import tracing
    from worker.core.bulk import backlog_warning
    from worker.core.change import validate

    settings = load_settings()
    tracing.continue_from_env()
    change: dict[str, object] = {field: value for field, value in fields if value is not None}
    id_errors: tuple[FieldError, ...] = ()
    if args.id is not None:
        try:
            change["id"] = parse_id_text(args.id)
        except InvalidChange as exc:
            id_errors, change["id"] = exc.errors, 1  # a stand-in, so that the other flags are checked too
    try:
        validated = validate(
            change,
            idempotency_key=args.key,
            account=args.account,
            source=args.source,
            known_accounts=settings.known_accounts,
        )
    except InvalidChange as exc:
        raise _in_flag_terms(InvalidChange([*id_errors, *exc.errors])) from None
    if id_errors:
        raise _in_flag_terms(InvalidChange(id_errors))
    receipt = _enqueue(settings, validated)
    emit(receipt.as_dict())
    if warning := backlog_warning([receipt], settings):
        note(f"warning: {warning}")
    return EXIT_OK


def _enqueue(settings: Settings, validated: tuple[LeadStageChange, Envelope]) -> Receipt:
    """Through ``worker.core.one_shot`` (no redis-py, no asyncio: the start-up is most of a
    single enqueue's time) when its client can talk to REDIS_URL; through the library otherwise."""
    from worker.core.resp import handles

    if handles(settings.redis_url):
        from worker.core.one_shot import enqueue_once

        return enqueue_once(settings, *validated)
    import asyncio

    from producers.library import LeadStageProducer

    async def enqueue() -> Receipt:
        async with LeadStageProducer(settings, producer="cli", metrics=False) as producer:
            (receipt,) = await producer.enqueue_validated([validated])
            return receipt

    return asyncio.run(enqueue())


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
