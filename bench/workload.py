"""The changes both sides process: the same request bodies, so both make the same POSTs.

Every change is an add with its own name: adds are the product's costlier path (a stage lock
by name, reconciliation on unknown outcomes), and with unique names no change supersedes or
waits for another, so each side makes exactly one successful POST per change against the
fault-free fake. The body is already in iVvy's canonical form (trimmed name, lower-case colour,
numeric applyTo), so the product's normalisation sends exactly what the baseline sends.
"""

from __future__ import annotations

from collections.abc import Sequence

#: A change as a producer hands it over (a JSON object).
Change = dict[str, object]
#: (idempotency key, change): the product keys by it; the baseline ignores the key (arq makes ids).
Item = tuple[str, Change]


def changes(tag: str, count: int) -> Sequence[Item]:
    """``count`` adds named after ``tag``; keys are unique within a run when tags are."""
    return [(f"{tag}-{i}", {"name": f"Bench {tag} {i}", "colour": "#3a7bd5", "applyTo": 2}) for i in range(count)]
