"""The long soak of leadstage-sync: ``python -m soak`` (see ``soak.run`` and RELIABILITY.md).

Not part of the test suite: it runs for minutes, starts its own Redis, fake iVvy and worker
processes, and kills them while thousands of changes go through, then checks the guarantees of
docs/contract.md from the fake's own state and the streams.
"""
