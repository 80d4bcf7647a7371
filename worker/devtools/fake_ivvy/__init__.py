"""A fake iVvy: a real aiohttp server that answers like the parts of the iVvy API we use.

The demo, the tests and the benchmarks run against it instead of iVvy, so it has to be faithful
where the product depends on iVvy's behaviour (signatures, error bodies, paging, specific codes,
the batch namespace) and able to misbehave on request (faults), because handling misbehaviour is
the product's job. Its calls: ``crm?action=addOrUpdateLeadStage``, ``crm?action=getLeadStageList``,
``test?action=ping`` and ``batch?action=run|progress|results``. One module per job:

* ``model``: the stages, the request log and the actions (``FakeIvvy``), independent of HTTP;
* ``params``: iVvy's error answer (``ApiError``) and the checks of each parameter;
* ``batch``: the batch namespace (run, progress, results, its limits and faults);
* ``faults``: what it does wrong, and how often (``Faults``);
* ``app``: the HTTP side (routing, signatures, faults, the admin endpoints) and
  ``running_fake_ivvy``, which serves one on a real socket;
* ``cli``: ``leadstage fake-ivvy``'s options.
"""

from worker.devtools.fake_ivvy.app import (
    DEFAULT_HOST,
    FAKE_IVVY_KEY,
    FakeOptions,
    RunningFakeIvvy,
    create_app,
    running_fake_ivvy,
)
from worker.devtools.fake_ivvy.batch import MAX_JOBS
from worker.devtools.fake_ivvy.cli import DEFAULT_PORT, add_arguments, run_from_args
from worker.devtools.fake_ivvy.faults import FAULT_FIELDS, FaultName, Faults, InvalidFaults
from worker.devtools.fake_ivvy.model import (
    ACTIONS,
    FIRST_STAGE_ID,
    MAX_PER_PAGE,
    FakeIvvy,
    Reason,
    RequestRecord,
    Stage,
    default_credentials,
)
from worker.devtools.fake_ivvy.params import ApiError

__all__ = [
    "ACTIONS",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "FAKE_IVVY_KEY",
    "FAULT_FIELDS",
    "FIRST_STAGE_ID",
    "MAX_JOBS",
    "MAX_PER_PAGE",
    "ApiError",
    "FakeIvvy",
    "FakeOptions",
    "FaultName",
    "Faults",
    "InvalidFaults",
    "Reason",
    "RequestRecord",
    "RunningFakeIvvy",
    "Stage",
    "add_arguments",
    "create_app",
    "default_credentials",
    "run_from_args",
    "running_fake_ivvy",
]
