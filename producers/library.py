"""The Python producer: validate lead-stage changes and put them on the queue.

Public API (re-exported by ``producers``)::

    async with LeadStageProducer(settings) as producer:            # or LeadStageProducer() (from env)
        receipt = await producer.enqueue({"name": "Hot", "applyTo": "lead"}, idempotency_key="crm-42")
        receipts = await producer.enqueue_many(
            [{"id": 1001, "colour": "#ff0000"}, ChangeItem({"name": "Cold", "applyTo": 2}, idempotency_key="k2")]
        )

* ``enqueue(change, *, idempotency_key=None, account="default", source="library") -> Receipt``:
  one change; ``Receipt.status`` is ``queued``, or ``duplicate`` when the key is already known
  with the same change (for the ledger retention, not only while arq keeps the job).
* ``enqueue_many(changes, *, account="default", source="library", progress=None) -> list[Receipt]``:
  each item is a change (a mapping) or a ``ChangeItem`` carrying its own key, account or source.
  All or nothing for the whole call: every item is validated, and every key checked against the
  ledger and against the items before it, before anything is written; then the batch goes to
  Redis in pipelined chunks (``worker.core.ledger.ENQUEUE_CHUNK`` changes per script call), so 50,000
  changes take a few dozen round trips, not 50,000. Only a concurrent producer writing one of its
  keys with another change between the check and the write stops it midway, with an
  ``IdempotencyConflict`` that counts what was enqueued (``enqueued_before``).
* ``validate_many`` and ``enqueue_validated``: the two halves of ``enqueue_many``, for producers
  that report errors their own way (line numbers, list indexes) or skip invalid items.
* ``wait(receipt_or_key, *, timeout, account="default") -> ResultEvent``: the change's terminal
  event, or ``WaitTimeout`` saying where it stands (``producers.outcomes``, which also has the
  consumer-group readers ``ResultsConsumer`` and ``DeadLetterConsumer``; ``producers.waits``).
* ``aclose()`` (or ``async with``) closes the Redis connection the producer opened itself; a
  client passed in belongs to the caller.

Errors (``worker.core.errors``): ``InvalidChange`` names each bad field (``InvalidBatch``, a subclass,
names the item index too, as ``changes[3].name``); ``UnknownAccount`` when there is an
account list (``Settings.known_accounts``: IVVY_*, LEADSTAGE_ACCOUNTS_FILE, LEADSTAGE_ACCOUNT_NAMES or
LEADSTAGE_WEBHOOK_SECRETS_FILE) and the account is not on it; otherwise only the account name's
format is checked. A producer host needs no iVvy credentials: LEADSTAGE_ACCOUNT_NAMES lists the
accounts by name.
``IdempotencyConflict`` when a known key comes with a different change (nothing of a batch is
enqueued); ``RedisUnavailable`` when Redis does not answer (nothing was enqueued), and its
subclass ``EnqueueOutcomeUnknown`` when Redis stopped answering after changes were sent: they
may or may not be enqueued, and enqueuing them again with the same keys is safe (a change
already written comes back as ``duplicate``). Every Redis command waits LEADSTAGE_REDIS_TIMEOUT
at most. Validation is ``worker.core.change``'s:
producers and workers apply the same rules.

Nothing is pickled: the queue holds job ids (``{account}:{idempotency_key}``) and each job's record
is its ledger hash, whose ``change`` is canonical JSON, so other languages can read and write them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from producers.clients import RedisUser
from producers.waits import SharedReader, Waits, blocking_read_s
from worker.core import tracing
from worker.core.change import DEFAULT_ACCOUNT, Envelope, LeadStageChange, validate
from worker.core.errors import FieldError, InvalidChange, UnknownAccount
from worker.core.ledger import Ledger, Receipt
from worker.core.redis_connection import RedisClient, connect_redis, connect_redis_of, connect_redis_or_cluster_of
from worker.core.settings import Settings

__all__ = [
    "ChangeItem",
    "InvalidBatch",
    "ItemError",
    "LeadStageProducer",
    "Receipt",
    "Validated",
    "connect_redis",
    "connect_redis_of",
]

DEFAULT_SOURCE: Final = "library"

#: A change that passed validation, with its envelope: what ``Ledger.enqueue_many`` takes.
Validated = tuple[LeadStageChange, Envelope]
#: Why one item of a batch was refused.
ItemError = InvalidChange | UnknownAccount


@dataclass(frozen=True, slots=True)
class ChangeItem:
    """One item of ``enqueue_many`` with its own envelope; None means the call's default."""

    #: The change: a mapping of the change's fields (docs/contract.md) (anything else is reported as invalid).
    change: object
    idempotency_key: str | None = None
    account: str | None = None
    source: str | None = None


def field_errors(error: ItemError) -> tuple[FieldError, ...]:
    """The bad fields of a refused item; an unknown account is a bad ``account`` field."""
    if isinstance(error, UnknownAccount):
        return (FieldError("account", "is not configured (see LEADSTAGE_ACCOUNTS_FILE)"),)
    return error.errors


class InvalidBatch(InvalidChange):
    """Items of a batch were refused; ``failures`` pairs each bad item's index with its error.

    As an ``InvalidChange`` its ``errors`` name the index in the field, e.g. ``changes[3].name``,
    so code that handles one invalid change handles a batch too.
    """

    def __init__(self, failures: Sequence[tuple[int, ItemError]]) -> None:
        self.failures = tuple(failures)
        super().__init__(
            [
                FieldError(f"changes[{index}].{error.field}", error.reason)
                for index, failure in self.failures
                for error in field_errors(failure)
            ]
        )


class LeadStageProducer(RedisUser[RedisClient], Waits):
    """Validates changes and enqueues them through the ledger (see the module docstring)."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis: RedisClient | None = None,
        producer: str = DEFAULT_SOURCE,
        metrics: bool = True,
    ) -> None:
        """``settings`` default to ``Settings.from_env()``; without ``redis`` a client for
        ``settings.redis_url`` is opened (and closed by ``aclose``). ``producer`` labels the
        ``leadstage_enqueued_total`` metric (library, cli, webhook); ``metrics=False`` leaves it
        alone (a short-lived process such as the CLI has nobody to scrape it, and is spared
        importing prometheus-client)."""
        self.settings = Settings.from_env() if settings is None else settings
        tracing.setup()
        self.metrics = metrics
        super().__init__(self.settings, redis, connect_redis_or_cluster_of)
        self.ledger = Ledger(self.redis, self.settings)
        self.producer = producer
        self.reader = SharedReader(self.redis, self.settings.results_stream, block_s=blocking_read_s(self.settings))

    async def aclose(self) -> None:
        """Stop the waits' reader; close the Redis client if this producer opened it."""
        await self.reader.aclose()
        await super().aclose()

    # -- validation ----------------------------------------------------------------------------

    def validate(
        self,
        change: object,
        *,
        idempotency_key: str | None = None,
        account: str = DEFAULT_ACCOUNT,
        source: str = DEFAULT_SOURCE,
    ) -> Validated:
        """The normalised change and its envelope; raises ``InvalidChange`` or ``UnknownAccount``.

        Field errors of the change and of the envelope are reported together.
        """
        return validate(
            change,
            idempotency_key=idempotency_key,
            account=account,
            source=source,
            known_accounts=self.settings.known_accounts,
        )

    def validate_many(
        self,
        changes: Iterable[object],
        *,
        account: str = DEFAULT_ACCOUNT,
        source: str = DEFAULT_SOURCE,
    ) -> tuple[list[tuple[int, Validated]], list[tuple[int, ItemError]]]:
        """Validate every item (a change, or a ``ChangeItem``): (index, valid item) and (index, error)."""
        valid: list[tuple[int, Validated]] = []
        failures: list[tuple[int, ItemError]] = []
        for index, item in enumerate(changes):
            if not isinstance(item, ChangeItem):
                item = ChangeItem(item)
            try:
                validated = self.validate(
                    item.change,
                    idempotency_key=item.idempotency_key,
                    account=account if item.account is None else item.account,
                    source=source if item.source is None else item.source,
                )
            except (InvalidChange, UnknownAccount) as exc:
                failures.append((index, exc))
            else:
                valid.append((index, validated))
        return valid, failures

    # -- enqueuing -----------------------------------------------------------------------------

    async def enqueue(
        self,
        change: Mapping[str, object],
        *,
        idempotency_key: str | None = None,
        account: str = DEFAULT_ACCOUNT,
        source: str = DEFAULT_SOURCE,
    ) -> Receipt:
        """Enqueue one change (a key is generated when none is given)."""
        validated = self.validate(change, idempotency_key=idempotency_key, account=account, source=source)
        (receipt,) = await self.enqueue_validated([validated])
        return receipt

    async def enqueue_many(
        self,
        changes: Iterable[Mapping[str, object] | ChangeItem],
        *,
        account: str = DEFAULT_ACCOUNT,
        source: str = DEFAULT_SOURCE,
        progress: Callable[[int], None] | None = None,
    ) -> list[Receipt]:
        """Enqueue a batch, all or nothing: ``InvalidBatch`` names every bad item before any is sent.

        Receipts come back in the order of ``changes``. ``progress`` is called with the number of
        changes of each chunk once it is enqueued.
        """
        valid, failures = self.validate_many(changes, account=account, source=source)
        if failures:
            raise InvalidBatch(failures)
        return await self.enqueue_validated(
            [item for _, item in valid], labels=[f"changes[{index}]" for index, _ in valid], progress=progress
        )

    async def enqueue_validated(
        self,
        items: Sequence[Validated],
        *,
        labels: Sequence[str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Receipt]:
        """Enqueue already validated items, all or nothing with respect to idempotency conflicts.

        ``labels`` name the items in the caller's terms for the errors (``changes[3]``).
        """
        with tracing.producer_span("enqueue", len(items), self.settings.queue_name):
            receipts = await self.ledger.enqueue_many(items, labels=labels, progress=progress)
        if not self.metrics:
            return receipts
        from worker.core import metrics

        for status in ("queued", "duplicate"):
            count = sum(1 for r in receipts if r.status == status)
            if count:
                metrics.ENQUEUED.labels(self.producer, status).inc(count)
        return receipts
