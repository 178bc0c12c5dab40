"""Which queue each step's task goes to: one queue by default, any step or system on its own.

``CELERY_STEP_QUEUES`` maps a step's name, or an external system's, to a queue:
``{"activate_esim": "esim"}`` sends that step's tasks there; ``{"whmcs": "whmcs"}``
every step that calls WHMCS (a step named on its own wins over its system). A
worker for that queue alone runs with ``-Q esim``; the others leave it out with
``-X esim`` (a worker without either consumes every queue). The failure write-back's task
(``provisioning.write_failure_on_order``) follows the ``salesforce`` system's queue. Unknown names are
refused at start, naming what the table has.
"""

from __future__ import annotations

from collections.abc import Mapping

from provisioning.runs.chain import CHAIN, Chain
from provisioning.runs.writeback import WRITE_FAILURE_TASK
from provisioning.step.spec import System


def step_queues(queues: Mapping[str, str], chain: Chain = CHAIN) -> dict[str, str]:
    """Task name → queue for the tasks that do not go to the default queue."""
    systems = {s.value for s in System}
    unknown = [key for key in queues if key not in chain and key not in systems]
    if unknown:
        raise ValueError(
            f"CELERY_STEP_QUEUES names {', '.join(map(repr, unknown))}: neither a step "
            f"({', '.join(chain.names)}) nor a system ({', '.join(sorted(systems))})"
        )
    routes: dict[str, str] = {}
    for spec in chain:
        queue = queues.get(spec.name) or queues.get(spec.system.value)
        if queue:
            routes[spec.task_name] = queue
    # The failure write-back's task (a Salesforce PATCH) goes where Salesforce's steps go.
    salesforce = queues.get(System.SALESFORCE.value)
    if salesforce:
        routes[WRITE_FAILURE_TASK] = salesforce
    return routes
