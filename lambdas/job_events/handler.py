"""``job_events`` Lambda: EventBridge "Batch Job State Change" (FAILED) → close the run's books.

A job that dies (spot reclaim after the last retry, OOM kill, timeout) cannot mark its own items;
this ends whatever it left open as SYSTEM_ERROR so that nobody waits for a run that will never end.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field

from lambdas.api.deps import run_store
from lambdas.observability import metrics, observe_job_events, tracer
from slidebridge.errors import NotFoundError
from slidebridge.jobs import close_failed_job
from slidebridge.settings import get_settings

logger = Logger(service="slidebridge")


class BatchJobStateDetail(BaseModel):
    """The part of the event's ``detail`` we use (lenient: AWS adds fields over time)."""

    model_config = ConfigDict(extra="ignore")

    job_id: str = Field(alias="jobId")
    status: str
    status_reason: str | None = Field(default=None, alias="statusReason")
    parameters: dict[str, str] = Field(default_factory=dict)
    array_properties: dict[str, Any] = Field(default_factory=dict, alias="arrayProperties")


# Traces record neither the answer nor exception text (reasons can quote vendor answers).
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)
@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
@observe_job_events(logger)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    detail = BatchJobStateDetail.model_validate(event.get("detail", {}))
    run_id = detail.parameters.get("run_id")
    if detail.status != "FAILED" or not run_id:
        logger.info("ignored job state change", extra={"job_id": detail.job_id, "status": detail.status})
        return {"ended_items": 0}
    # A child of an array job carries its index; the parent (or a plain job) covers every item.
    index = detail.array_properties.get("index")
    indices = [int(index)] if index is not None else None
    try:
        ended = close_failed_job(
            run_store(), get_settings(), run_id, indices=indices, reason=detail.status_reason or "no reason given"
        )
    except NotFoundError:
        logger.warning("job for unknown run", extra={"run_id": run_id, "job_id": detail.job_id})
        return {"ended_items": 0}
    logger.info("closed items of a failed job", extra={"run_id": run_id, "job_id": detail.job_id, "ended": len(ended)})
    return {"ended_items": len(ended)}
