"""``scheduler`` Lambda: an EventBridge schedule (``rate(5 minutes)``) → cancel the runs past their deadline,
and close the runs that never got a job (``slidebridge.scheduling.close_unlaunched_runs``).

The event's content is not used: each invocation sweeps every deadline that has passed by now
(``slidebridge.scheduling.cancel_overdue_runs``), so a missed or doubled invocation changes nothing
but how late a run is cancelled. The job also checks its run's deadline before each item.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.api.deps import run_store
from slidebridge.launcher import launcher_from_settings
from slidebridge.scheduling import cancel_overdue_runs, close_unlaunched_runs
from slidebridge.settings import get_settings

logger = Logger(service="slidebridge")


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    settings = get_settings()
    cancelled = cancel_overdue_runs(run_store(), launcher_from_settings(settings), settings=settings)
    if cancelled:
        logger.info("cancelled overdue runs", extra={"run_ids": [run.run_id for run in cancelled]})
    never_started = close_unlaunched_runs(run_store(), settings)
    if never_started:
        # The monitoring stack's RunsNeverStarted alarm matches this message exactly.
        logger.error("closed runs that never got a job", extra={"run_ids": never_started})
    return {"cancelled": len(cancelled), "never_started": len(never_started)}
