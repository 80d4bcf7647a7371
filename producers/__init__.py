"""Producers of lead-stage changes: the Python library (here) and the HTTP webhook (``producers.webhook``).

``from producers import LeadStageProducer``; see ``producers.library`` for the API, and
``producers.outcomes`` for learning what became of the changes (``wait``, ``ResultsConsumer``).

Names are loaded on first use (PEP 562), so that a command importing ``producers.library``
alone (a single ``leadstage enqueue``) does not also load the readers and the consumer groups.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ loads them
    from producers.library import ChangeItem, InvalidBatch, LeadStageProducer, Receipt
    from producers.outcomes import DeadLetterConsumer, ResultsConsumer
    from worker.core.errors import UnknownChange, WaitTimeout
    from worker.core.results import DeadLetter, ResultEvent

#: Each public name and the module that defines it.
_ORIGINS: Final = {
    "ChangeItem": "producers.library",
    "DeadLetter": "worker.core.results",
    "DeadLetterConsumer": "producers.outcomes",
    "InvalidBatch": "producers.library",
    "LeadStageProducer": "producers.library",
    "Receipt": "producers.library",
    "ResultEvent": "worker.core.results",
    "ResultsConsumer": "producers.outcomes",
    "UnknownChange": "worker.core.errors",
    "WaitTimeout": "worker.core.errors",
}

__all__ = [
    "ChangeItem",
    "DeadLetter",
    "DeadLetterConsumer",
    "InvalidBatch",
    "LeadStageProducer",
    "Receipt",
    "ResultEvent",
    "ResultsConsumer",
    "UnknownChange",
    "WaitTimeout",
]


def __getattr__(name: str) -> Any:  # what the name is: its module says (and types it)
    if name not in _ORIGINS:
        raise AttributeError(f"module 'producers' has no attribute {name!r}")
    return getattr(importlib.import_module(_ORIGINS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
