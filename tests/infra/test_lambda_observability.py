"""Powertools Tracer and Metrics in the api and job_events handlers: metrics out, nothing broken locally.

The handlers run in-process (as the integration tests and the local stack run them): Tracer is off
outside Lambda, and the metrics go to stdout as EMF.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from lambdas.api import deps
from lambdas.api import handler as api_handler
from lambdas.job_events import handler as job_events_handler
from lambdas.observability import front_door, tracer
from slidebridge.settings import get_settings
from slidebridge.store import TABLE_DEFINITION
from tests.apigw import LambdaContext, api_event

TABLE = "slidebridge-observability-test"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("SLIDEBRIDGE_TABLE_NAME", TABLE)
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "slidebridge-test")
    deps.reset()
    with mock_aws():
        boto3.client("dynamodb").create_table(TableName=TABLE, **TABLE_DEFINITION)
        yield
    deps.reset()
    get_settings.cache_clear()


def _emf(output: str) -> list[dict[str, Any]]:
    records = []
    for line in output.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if "_aws" in record:
                records.append(record)
    return records


def test_tracer_is_off_outside_lambda() -> None:
    assert tracer.disabled


@pytest.mark.parametrize(
    ("path", "door"),
    [
        ("/hooks/sectra/k/info", "sectra"),
        ("/hooks/techcyte/k", "techcyte"),
        ("/api/v1/runs", "platform"),
        ("/favicon.ico", "other"),
    ],
)
def test_front_door_of_a_path(path: str, door: str) -> None:
    assert front_door(path) == door


def test_api_request_counts_per_front_door_and_keys_logs_by_run_id(
    aws: None, capsys: pytest.CaptureFixture[str]
) -> None:
    response = api_handler.handler(api_event("GET", "/api/v1/runs/run-123"), LambdaContext())  # type: ignore[arg-type]
    assert response["statusCode"] == 401  # no token: the request itself still counts
    (record,) = [r for r in _emf(capsys.readouterr().out) if "Requests" in r]
    assert record["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "Slidebridge"
    assert record["front_door"] == "platform"
    assert (record["Requests"], record["ServerErrors"]) == ([1.0], [0.0])
    assert api_handler.logger.get_current_keys()["run_id"] == "run-123"


def test_api_unknown_route_counts_as_other(aws: None, capsys: pytest.CaptureFixture[str]) -> None:
    response = api_handler.handler(api_event("GET", "/nowhere"), LambdaContext())  # type: ignore[arg-type]
    assert response["statusCode"] == 404
    (record,) = [r for r in _emf(capsys.readouterr().out) if "Requests" in r]
    assert record["front_door"] == "other"
    # A new request forgets the previous one's run id.
    assert "run_id" not in api_handler.logger.get_current_keys()


def test_job_event_for_an_unknown_run_is_counted_and_keyed(aws: None, capsys: pytest.CaptureFixture[str]) -> None:
    event = {
        "detail-type": "Batch Job State Change",
        "source": "aws.batch",
        "detail": {"jobId": "j-1", "status": "FAILED", "parameters": {"run_id": "run-gone"}},
    }
    assert job_events_handler.handler(event, LambdaContext()) == {"ended_items": 0}  # type: ignore[arg-type]
    records = _emf(capsys.readouterr().out)
    (record,) = [r for r in records if "JobStateEvents" in r]
    assert record["JobStateEvents"] == [1.0]
    # No item was ended: no JOB_FAILED count.
    assert not [r for r in records if "ItemErrors" in r]
    assert job_events_handler.logger.get_current_keys()["run_id"] == "run-gone"
