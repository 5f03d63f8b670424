"""``job_metrics`` Lambda: the batch job's log lines and the job queue's backlog → CloudWatch metrics.

Two triggers, one function:

- A CloudWatch Logs subscription on the job's log group delivers the lines that matter (the stack's
  filter pattern): ``item metrics {json}`` (one per processed item, batch_job/pipeline.py) and the item
  failure lines. They become ``SlidesProcessed``, ``Tiles``, ``TilesPerSecond``, ``<Stage>Seconds`` and
  ``ItemErrors`` by ``error_code``, as EMF.
- An EventBridge schedule: the number of jobs waiting on the queue and the age of the oldest
  (``QueuedJobs``, ``OldestQueuedJobAgeSeconds``); AWS Batch publishes no such metric itself.

Why not CloudWatch Logs metric filters: the job writes a text prefix before its JSON
(``<time> INFO batch_job.pipeline run=<id> item metrics {...}``). JSON filters need the whole event
to be JSON, and space-delimited filters split the JSON at every blank, leaving values such as
``"1234,"`` that are not numbers. EMF from the job itself would need a change to the job's logging.
Parsing here uses the job's own format with ``json`` and is tested against its format strings.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import time
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lambdas.observability import count_item_errors, metrics, tracer
from slidebridge.settings import get_settings

if TYPE_CHECKING:
    from mypy_boto3_batch import BatchClient

logger = Logger(service="slidebridge")

# batch_job/__main__.py's log format: "%(asctime)s %(levelname)s %(name)s run=<run id> %(message)s".
_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>\S+) run=(?P<run_id>\S+) (?P<message>.*)$", re.DOTALL)
# batch_job/pipeline.py's messages (tests/infra/test_job_metrics_handler.py checks them against its source).
ITEM_METRICS_PREFIX = "item metrics "
_INPUT_ERROR = re.compile(r"^item failed on its input: (?P<code>[A-Z][A-Z0-9_]*) \(")
_LAST_ATTEMPT = "transient failure on the last attempt:"
_INTERNAL_ERROR = "item failed on our side"
_RETRY = re.compile(r"^transient failure on attempt \d+:")
# The subscription filter pattern: any line containing one of these (CloudWatch Logs filter syntax).
SUBSCRIPTION_TERMS = ("item metrics", "item failed", "transient failure")

# Jobs still waiting for an instance (SUBMITTED, PENDING, RUNNABLE) count as queued.
QUEUED_STATUSES = ("SUBMITTED", "PENDING", "RUNNABLE")
_METRIC_NAME = re.compile(r"[^A-Za-z0-9]")


class ItemMetrics(BaseModel):
    """The ``item metrics`` JSON (lenient: the job may add fields)."""

    model_config = ConfigDict(extra="ignore")

    run_id: str
    item_index: int
    tiles: int = Field(ge=0)
    tiles_per_s: float = Field(ge=0)
    seconds: dict[str, float] = Field(default_factory=dict)
    # "analyse" split into its sub-stages (tissue, tiles_classify, regions).
    analyse_seconds: dict[str, float] = Field(default_factory=dict)
    # Share of tiles_classify the classifier waited for tiles (0: reading kept up).
    classifier_wait_fraction: float | None = Field(default=None, ge=0, le=1)


class JobLine(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["item", "error", "retry"]
    run_id: str
    item: ItemMetrics | None = None
    error_code: str | None = None


def parse_job_line(line: str) -> JobLine | None:
    """One job log line → what it reports, or None for any other line."""
    match = _LINE.match(line.strip())
    if match is None:
        return None
    run_id, message = match["run_id"], match["message"]
    if message.startswith(ITEM_METRICS_PREFIX):
        try:
            item = ItemMetrics.model_validate_json(message.removeprefix(ITEM_METRICS_PREFIX))
        except ValidationError:
            logger.warning("unreadable item metrics line", extra={"run_id": run_id})
            return None
        return JobLine(kind="item", run_id=run_id, item=item)
    if error := _INPUT_ERROR.match(message):
        return JobLine(kind="error", run_id=run_id, error_code=error["code"])
    if message.startswith(_LAST_ATTEMPT):
        return JobLine(kind="error", run_id=run_id, error_code="RETRIES_EXHAUSTED")
    if message.startswith(_INTERNAL_ERROR):
        return JobLine(kind="error", run_id=run_id, error_code="INTERNAL_ERROR")
    if _RETRY.match(message):
        return JobLine(kind="retry", run_id=run_id)
    return None


def stage_metric_name(stage: str) -> str:
    """``download`` → ``DownloadSeconds``; characters CloudWatch names should not carry are dropped."""
    return _METRIC_NAME.sub("", stage.title()) + "Seconds"


def decode_log_events(event: dict[str, Any]) -> Iterator[str]:
    """The messages of a CloudWatch Logs subscription event (base64 of gzip of JSON)."""
    payload = json.loads(gzip.decompress(base64.b64decode(event["awslogs"]["data"])))
    if payload.get("messageType") != "DATA_MESSAGE":
        return  # CONTROL_MESSAGE: CloudWatch Logs checking that the destination is reachable
    for log_event in payload.get("logEvents", []):
        yield str(log_event.get("message", ""))


def record_job_lines(lines: Iterable[str]) -> int:
    """Add the metrics the lines report; returns how many lines reported something."""
    reported = 0
    for line in lines:
        parsed = parse_job_line(line)
        if parsed is None:
            continue
        reported += 1
        if parsed.kind == "item" and parsed.item is not None:
            metrics.add_metric(name="SlidesProcessed", unit=MetricUnit.Count, value=1)
            metrics.add_metric(name="Tiles", unit=MetricUnit.Count, value=parsed.item.tiles)
            metrics.add_metric(name="TilesPerSecond", unit=MetricUnit.CountPerSecond, value=parsed.item.tiles_per_s)
            for stage, seconds in parsed.item.seconds.items():
                metrics.add_metric(name=stage_metric_name(stage), unit=MetricUnit.Seconds, value=seconds)
            for stage, seconds in parsed.item.analyse_seconds.items():
                metrics.add_metric(name=stage_metric_name(f"analyse {stage}"), unit=MetricUnit.Seconds, value=seconds)
            if parsed.item.classifier_wait_fraction is not None:
                metrics.add_metric(
                    name="ClassifierWaitPercent",
                    unit=MetricUnit.Percent,
                    value=round(100 * parsed.item.classifier_wait_fraction, 1),
                )
            logger.info("item metrics", extra={"run_id": parsed.run_id, "item_index": parsed.item.item_index})
        elif parsed.kind == "error" and parsed.error_code is not None:
            count_item_errors(parsed.error_code, 1)
        elif parsed.kind == "retry":
            metrics.add_metric(name="ItemRetries", unit=MetricUnit.Count, value=1)
    return reported


class QueueBacklog(BaseModel):
    model_config = ConfigDict(frozen=True)

    queued_jobs: int
    oldest_age_s: float


def queue_backlog(client: BatchClient, job_queue: str, now_s: float) -> QueueBacklog:
    """Jobs waiting on ``job_queue`` and how long the oldest has waited (0 when none)."""
    count, oldest_ms = 0, None
    paginator = client.get_paginator("list_jobs")
    for status in QUEUED_STATUSES:
        for page in paginator.paginate(jobQueue=job_queue, jobStatus=status):
            for job in page["jobSummaryList"]:
                count += 1
                created = job.get("createdAt")
                if created is not None and (oldest_ms is None or created < oldest_ms):
                    oldest_ms = created
    age = max(0.0, now_s - oldest_ms / 1000) if oldest_ms is not None else 0.0
    return QueueBacklog(queued_jobs=count, oldest_age_s=round(age, 1))


@lru_cache(maxsize=1)
def batch_client() -> BatchClient:
    # Created on first use, never at import (DESIGN §2).
    return boto3.client("batch")


@tracer.capture_lambda_handler(capture_response=False, capture_error=False)
@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    if "awslogs" in event:
        return {"reported_lines": record_job_lines(decode_log_events(event))}
    backlog = queue_backlog(batch_client(), get_settings().job_queue, time.time())
    metrics.add_metric(name="QueuedJobs", unit=MetricUnit.Count, value=backlog.queued_jobs)
    metrics.add_metric(name="OldestQueuedJobAgeSeconds", unit=MetricUnit.Seconds, value=backlog.oldest_age_s)
    return backlog.model_dump()
