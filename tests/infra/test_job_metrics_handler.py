"""job_metrics Lambda: the job's log lines and the queue backlog become CloudWatch metrics (EMF on stdout).

The lines are built with the job's own log format and message formats, which are also checked against
batch_job's source: a changed message there fails here instead of silently dropping a metric.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from lambdas.job_metrics import handler as job_metrics
from lambdas.job_metrics.handler import parse_job_line, queue_backlog, stage_metric_name
from tests.apigw import LambdaContext

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_FORMAT = "%(asctime)s %(levelname)s %(name)s run={run_id} %(message)s"
RUN_ID = "0b7c3f52-5d0e-4a51-9d4b-2f8f8c1f6a10"


def job_line(message: str, *args: Any, level: int = logging.INFO, run_id: str = RUN_ID) -> str:
    """A line exactly as batch_job/__main__.py's logging writes it."""
    formatter = logging.Formatter(JOB_FORMAT.format(run_id=run_id))
    record = logging.LogRecord("batch_job.pipeline", level, __file__, 1, message, args, None)
    return formatter.format(record)


ITEM = {
    "run_id": RUN_ID,
    "item_index": 2,
    "tiles": 1840,
    "tiles_per_s": 212.5,
    "seconds": {"download": 41.2, "open": 1.1, "analyse": 8.66, "artifacts": 3.0, "delivery": 0.4},
    "analyse_seconds": {"tissue": 1.5, "tiles_classify": 6.9, "regions": 0.26},
    "classifier_wait_fraction": 0.036,
    "slide_px": [98304, 75264],
}


def test_job_formats_are_the_ones_parsed() -> None:
    main_source = (REPO_ROOT / "batch_job" / "__main__.py").read_text()
    assert 'format="%(asctime)s %(levelname)s %(name)s run=" + args.run_id + " %(message)s"' in main_source
    pipeline = (REPO_ROOT / "batch_job" / "pipeline.py").read_text()
    for message in (
        '"item metrics %s"',
        '"item failed on its input: %s (%s)"',
        '"transient failure on the last attempt: %s"',
        '"item failed on our side"',
        '"transient failure on attempt %d: %s; handing the item back"',
    ):
        assert message in pipeline, message


def test_item_metrics_line_is_read() -> None:
    parsed = parse_job_line(job_line("item metrics %s", json.dumps(ITEM)))
    assert parsed is not None
    assert parsed.kind == "item"
    assert parsed.run_id == RUN_ID
    assert parsed.item is not None
    assert parsed.item.tiles == 1840
    assert parsed.item.tiles_per_s == 212.5
    assert parsed.item.seconds["download"] == 41.2


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (job_line("item failed on its input: %s (%s)", "CHECKSUM_MISMATCH", "crc32c differs (x)"), "CHECKSUM_MISMATCH"),
        (job_line("transient failure on the last attempt: %s", "Sectra answered 503"), "RETRIES_EXHAUSTED"),
        (job_line("item failed on our side", level=logging.ERROR), "INTERNAL_ERROR"),
    ],
)
def test_failure_lines_give_their_error_code(line: str, code: str) -> None:
    parsed = parse_job_line(line)
    assert parsed is not None
    assert (parsed.kind, parsed.error_code) == ("error", code)


def test_retry_and_other_lines() -> None:
    retry = parse_job_line(job_line("transient failure on attempt %d: %s; handing the item back", 1, "timeout"))
    assert retry is not None
    assert retry.kind == "retry"
    assert parse_job_line(job_line("classified %d/%d tiles (%.1f tiles/s)", 10, 20, 5.0)) is None
    assert parse_job_line("Traceback (most recent call last):") is None
    # A truncated metrics line is skipped, not raised.
    assert parse_job_line(job_line("item metrics %s", '{"run_id": "x", "tiles": ')) is None


def test_stage_metric_names() -> None:
    assert stage_metric_name("download") == "DownloadSeconds"
    assert stage_metric_name("analyse") == "AnalyseSeconds"
    assert stage_metric_name("odd stage!") == "OddStageSeconds"


def _subscription_event(messages: list[str]) -> dict[str, Any]:
    payload = {
        "messageType": "DATA_MESSAGE",
        "logGroup": "/slidebridge/job",
        "logEvents": [{"id": str(i), "timestamp": 0, "message": m} for i, m in enumerate(messages)],
    }
    return {"awslogs": {"data": base64.b64encode(gzip.compress(json.dumps(payload).encode())).decode()}}


def _emf(output: str) -> list[dict[str, Any]]:
    return [record for line in output.splitlines() if line.startswith("{") and "_aws" in (record := json.loads(line))]


def test_log_subscription_becomes_emf_metrics(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "slidebridge-test")
    event = _subscription_event(
        [
            job_line("item metrics %s", json.dumps(ITEM)),
            job_line("item failed on its input: %s (%s)", "UNSUPPORTED_FORMAT", "not a slide"),
            job_line("classified %d/%d tiles (%.1f tiles/s)", 10, 20, 5.0),
        ]
    )
    answer = job_metrics.handler(event, LambdaContext())  # type: ignore[arg-type]
    assert answer == {"reported_lines": 2}

    records = _emf(capsys.readouterr().out)
    errors = [r for r in records if "ItemErrors" in r]
    assert [(r["error_code"], r["ItemErrors"], r["service"]) for r in errors] == [
        ("UNSUPPORTED_FORMAT", [1.0], "slidebridge-test")
    ]
    (main,) = [r for r in records if "SlidesProcessed" in r]
    assert main["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "Slidebridge"
    assert main["SlidesProcessed"] == [1.0]
    assert main["Tiles"] == [1840.0]
    assert main["TilesPerSecond"] == [212.5]
    assert main["DownloadSeconds"] == [41.2]
    assert main["DeliverySeconds"] == [0.4]
    # Where the analysis went, and whether reading kept the classifier busy.
    assert main["AnalyseTissueSeconds"] == [1.5]
    assert main["AnalyseTilesClassifySeconds"] == [6.9]
    assert main["AnalyseRegionsSeconds"] == [0.26]
    assert main["ClassifierWaitPercent"] == [3.6]
    units = {m["Name"]: m["Unit"] for m in main["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert units["ClassifierWaitPercent"] == "Percent"
    assert units["AnalyseTilesClassifySeconds"] == "Seconds"


def test_metrics_line_of_an_older_job_without_the_analysis_split_is_still_read() -> None:
    older = {k: v for k, v in ITEM.items() if k not in ("analyse_seconds", "classifier_wait_fraction")}
    parsed = parse_job_line(job_line("item metrics %s", json.dumps(older)))
    assert parsed is not None and parsed.item is not None
    assert parsed.item.analyse_seconds == {}
    assert parsed.item.classifier_wait_fraction is None


def test_control_message_is_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    payload = {"messageType": "CONTROL_MESSAGE", "logEvents": [{"id": "0", "timestamp": 0, "message": "check"}]}
    event = {"awslogs": {"data": base64.b64encode(gzip.compress(json.dumps(payload).encode())).decode()}}
    with pytest.warns(UserWarning, match="No application metrics"):
        assert job_metrics.handler(event, LambdaContext()) == {"reported_lines": 0}  # type: ignore[arg-type]


class FakeBatch:
    """list_jobs pages per status, as boto3's paginator yields them."""

    def __init__(self, jobs: dict[str, list[dict[str, Any]]]) -> None:
        self.jobs = jobs
        self.asked: list[tuple[str, str]] = []

    def get_paginator(self, operation: str) -> FakeBatch:
        assert operation == "list_jobs"
        return self

    def paginate(self, *, jobQueue: str, jobStatus: str) -> list[dict[str, Any]]:
        self.asked.append((jobQueue, jobStatus))
        listed = self.jobs.get(jobStatus, [])
        # Two pages, to show every page counts.
        return [{"jobSummaryList": listed[:1]}, {"jobSummaryList": listed[1:]}]


def test_queue_backlog_counts_waiting_jobs_and_ages_the_oldest() -> None:
    now = 1_800_000_000.0
    fake = FakeBatch(
        {
            "SUBMITTED": [{"jobId": "a", "createdAt": int((now - 30) * 1000)}],
            "RUNNABLE": [
                {"jobId": "b", "createdAt": int((now - 5400) * 1000)},
                {"jobId": "c", "createdAt": int((now - 60) * 1000)},
            ],
        }
    )
    backlog = queue_backlog(fake, "arn:aws:batch:eu-west-1:123456789012:job-queue/q", now)  # type: ignore[arg-type]
    assert backlog.queued_jobs == 3
    assert backlog.oldest_age_s == 5400.0
    assert {status for _, status in fake.asked} == {"SUBMITTED", "PENDING", "RUNNABLE"}
    assert queue_backlog(FakeBatch({}), "q", now).oldest_age_s == 0.0  # type: ignore[arg-type]


def test_scheduled_invocation_publishes_the_backlog(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from slidebridge.settings import get_settings  # noqa: PLC0415

    monkeypatch.setenv("SLIDEBRIDGE_JOB_QUEUE", "arn:aws:batch:eu-west-1:123456789012:job-queue/slidebridge")
    get_settings.cache_clear()
    fake = FakeBatch({"RUNNABLE": [{"jobId": "b", "createdAt": 0}]})
    monkeypatch.setattr(job_metrics, "batch_client", lambda: fake)
    try:
        answer = job_metrics.handler({"detail-type": "Scheduled Event"}, LambdaContext())  # type: ignore[arg-type]
    finally:
        get_settings.cache_clear()
    assert answer["queued_jobs"] == 1
    assert fake.asked[0][0] == "arn:aws:batch:eu-west-1:123456789012:job-queue/slidebridge"
    (record,) = [r for r in _emf(capsys.readouterr().out) if "QueuedJobs" in r]
    assert record["QueuedJobs"] == [1.0]
    assert record["OldestQueuedJobAgeSeconds"][0] > 0
