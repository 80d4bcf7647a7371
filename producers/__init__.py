"""Producers of lead-stage changes: the Python library (here) and the HTTP webhook (``producers.webhook``).

``from producers import LeadStageProducer``; see ``producers.library`` for the API, and
``producers.outcomes`` for learning what became of the changes (``wait``, ``ResultsConsumer``).
"""

from producers.library import ChangeItem, InvalidBatch, LeadStageProducer, Receipt
from producers.outcomes import DeadLetterConsumer, ResultsConsumer
from producers.waits import UnknownChange, WaitTimeout
from worker.core.results import DeadLetter, ResultEvent

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
