"""leadstage-sync benchmarks: the product against a bare arq job, in one run, on one machine.

``python -m bench`` (see ``bench.run``) starts its own loopback Redis and fake iVvy, then runs
every phase twice, once for each side, with the same changes, the same fake, the same
concurrency and poll delay:

* the baseline (``bench.baseline``): a bare arq job making the same signed POST, enqueued with
  ``enqueue_job``, with arq's defaults otherwise;
* the product (``bench.product``): ``LeadStageProducer.enqueue_many``, the product's worker and
  its results stream.

Both sides are driven by the same phase code (``bench.phases``) and measured by the same code
(``bench.measure``), so a difference in the table is a difference between the two systems, not
between two ways of measuring them. ``BENCHMARKS.md`` at the repository root holds a run's
table and what it means.
"""
