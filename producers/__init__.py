"""Producers of lead-stage changes: the Python library (here) and the HTTP webhook (``producers.webhook``).

``from producers import LeadStageProducer``; see ``producers.library`` for the API.
"""

from producers.library import ChangeItem, InvalidBatch, LeadStageProducer, Receipt

__all__ = ["ChangeItem", "InvalidBatch", "LeadStageProducer", "Receipt"]
