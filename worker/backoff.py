"""When to try again: exponential backoff with full jitter, honouring Retry-After."""

from __future__ import annotations

import random


def backoff_seconds(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Delay before attempt ``attempt + 1``: uniform in [0, min(cap, base * 2**(attempt-1))].

    Full jitter spreads retries of many jobs that failed together (AWS architecture blog,
    "Exponential Backoff And Jitter"); a server's Retry-After is a floor, never shortened.
    """
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    delay = (rng or random).uniform(0, ceiling)
    return max(delay, retry_after or 0.0)
