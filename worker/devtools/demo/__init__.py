"""``leadstage demo``: the product's main job, end to end, on an embedded default.

One command shows what leadstage-sync does without any set-up beyond a Redis: a fake iVvy
(``worker.devtools.fake_ivvy``) and a worker run in this process, sample changes go through the producer
library, and every result is printed as it arrives on the results stream:

1. adds, a change the producer refuses (it never reaches the queue), a duplicate enqueue of the
   same key, and an update of a built-in stage that iVvy refuses (24321: dead-lettered);
2. an update of the stage the first add created;
3. iVvy misbehaving for one change (5xx, then 429 with Retry-After), retried with backoff.

Then a summary, with the Prometheus series the run moved. The exit status says whether every
sample ended as expected, so the demo doubles as a smoke test of a deployment's Redis.

Isolation: a demo may be pointed at a production Redis, so it never shares a key with
production. Its queue and streams have their own names, its changes belong to their own account
(``DEMO_ACCOUNT``: stage ordering, locks, claims and the rate limiter are per account), and its
idempotency keys carry a per-run prefix. Its keys are cleared at the start of each run, so reruns
are deterministic, and left at the end, so the results and dead letters can be inspected.

Redis: ``REDIS_URL``; when nothing answers there and ``redis-server`` is on PATH, the demo runs
its own on a free loopback port, in a temporary directory, and stops it at the end (also on an
error, Ctrl-C or SIGTERM).

One module per job: ``printer`` (the readable lines), ``samples`` (the sample changes, what each
is expected to do, following their results), ``embedded`` (its Redis, fake iVvy, settings and
names), ``run`` (``run_demo``: set-up, samples, summary, exit status).
"""

from worker.devtools.demo.embedded import DEMO_ACCOUNT, DEMO_DLQ, DEMO_QUEUE, DEMO_RESULTS
from worker.devtools.demo.run import run_demo

__all__ = ["DEMO_ACCOUNT", "DEMO_DLQ", "DEMO_QUEUE", "DEMO_RESULTS", "run_demo"]
