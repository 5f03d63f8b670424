"""``POST /hooks/techcyte/{key}`` through the real ``api`` handler, with moto for DynamoDB, S3 and Batch.

What the lab sees at request time: an immediate 200 naming our run, one run per task, one item per
scan, and a clear 4xx (with nothing stored and no job) for anything we cannot act on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import boto3
import pytest

from lambdas.api.handler import handler
from slidebridge.runs import ItemState, RunSource
from slidebridge.store import RunStore
from slidebridge.vendors.techcyte_service import TASK_TOKEN
from tests.apigw import LambdaContext, api_event
from tests.integration.conftest import TABLE

FIXTURES = Path(__file__).parent.parent / "fixtures" / "techcyte"
KEY = "techcyte-key-7f3a9"
HOOK = f"/hooks/techcyte/{KEY}"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJ0YXNrIjo0MjQyfQ.c2ln"


@pytest.fixture
def api(batch_api: None, monkeypatch: pytest.MonkeyPatch) -> RunStore:
    monkeypatch.setenv("SLIDEBRIDGE_TECHCYTE_WEBHOOK_KEY", KEY)
    # Techcyte's presigned URLs point at the customer's S3 bucket in us-west-2 (fixtures).
    monkeypatch.setenv("SLIDEBRIDGE_DOWNLOAD_HOSTS", "bucket.s3.us-west-2.amazonaws.com")
    return RunStore(TABLE)


def _fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return loaded


def post(body: Any = None, *, raw_body: str | None = None, path: str = HOOK) -> tuple[int, Any]:
    response = handler(api_event("POST", path, body=body, raw_body=raw_body), LambdaContext())  # type: ignore[arg-type]
    return response["statusCode"], json.loads(response["body"]) if response.get("body") else None


def _jobs() -> list[dict[str, Any]]:
    batch = boto3.client("batch")
    queue = batch.describe_job_queues()["jobQueues"][0]["jobQueueArn"]
    jobs: list[dict[str, Any]] = []
    for status in ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED"):
        jobs.extend(batch.list_jobs(jobQueue=queue, jobStatus=status)["jobSummaryList"])
    # Array children ("<parent>:<index>") belong to their parent's submission.
    return [job for job in jobs if ":" not in job["jobId"]]


def _records() -> list[dict[str, Any]]:
    return boto3.client("dynamodb").scan(TableName=TABLE)["Items"]


# --- accepted ------------------------------------------------------------------------------------


def test_task_becomes_one_run_with_one_item_per_scan_and_one_array_job(
    api: RunStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # botocore DEBUG logs request bodies: not ours to police
    body = _fixture("webhook_full.json")

    status, answer = post(body)

    assert status == 200, answer
    assert answer["message"] == "accepted"
    run = api.get_run(answer["run_id"])
    assert run.source is RunSource.TECHCYTE
    assert run.vendor_context["task_id"] == "dGFzazo0MjQy"
    assert run.vendor_context["task_number"] == 4242
    assert run.vendor_context["stains"] == {"5550001": "HE"}
    items = api.list_items(run.run_id)
    assert [item.external_id for item in items] == ["5550001", "5550002"]
    assert all(item.state is ItemState.PENDING for item in items)
    # scan_urls wins over scans: the DICOM series of scan 5550002 keeps all three files.
    assert [a.download_url for a in items[1].input_artifacts] == body["scan_urls"]["5550002"]
    # One job, an array of one child per scan, that carries the run id and nothing else.
    (summary,) = _jobs()
    job = boto3.client("batch").describe_jobs(jobs=[summary["jobId"]])["jobs"][0]
    assert job["arrayProperties"]["size"] == 2
    assert job["parameters"] == {"run_id": run.run_id}
    # The task JWT is stored apart from the run and appears nowhere else: not in the run, the job
    # or the logs; neither do the presigned URLs' signatures.
    assert api.get_credential(run.run_id, TASK_TOKEN) == JWT
    assert JWT not in run.model_dump_json()
    assert JWT not in json.dumps(job, default=str)
    assert "X-Amz-Signature" not in json.dumps(job, default=str)
    assert JWT not in caplog.text
    assert "X-Amz-Signature" not in caplog.text


def test_repeated_delivery_answers_the_same_run_and_starts_nothing(api: RunStore) -> None:
    body = _fixture("webhook_full.json")
    _, first = post(body)
    records = len(_records())

    status, again = post(body)

    assert status == 200
    assert again == first
    assert len(_jobs()) == 1
    assert len(_records()) == records


def test_old_payload_without_scan_urls_falls_back_to_scans(api: RunStore) -> None:
    body = _fixture("webhook_full.json")
    del body["scan_urls"], body["stains"], body["jwt_token"]

    status, answer = post(body)

    assert status == 200, answer
    items = api.list_items(answer["run_id"])
    assert [[a.download_url for a in item.input_artifacts] for item in items] == [
        [body["scans"]["5550001"]],
        [body["scans"]["5550002"]],
    ]
    assert api.get_credential(answer["run_id"], TASK_TOKEN) is None


def test_model_naming_an_application_runs_it(api: RunStore) -> None:
    body = _fixture("webhook_full.json") | {"model_id": "he-tissue@1.0.0"}

    status, answer = post(body)

    assert status == 200, answer
    run = api.get_run(answer["run_id"])
    assert (run.application_id, run.version_number) == ("he-tissue", "1.0.0")


# --- refused ---------------------------------------------------------------------------------------


def _nothing_stored() -> None:
    assert _records() == []
    assert _jobs() == []


@pytest.mark.parametrize(
    ("fixture", "names"),
    [
        ("no_task_id.json", "task_id"),
        ("no_scans.json", "no scan"),
        ("non_numeric_scan.json", "not numeric"),
        ("scan_without_url.json", "has no download URL"),
    ],
)
def test_payload_we_cannot_act_on_is_422_naming_the_problem_and_stores_nothing(
    api: RunStore, fixture: str, names: str
) -> None:
    status, answer = post(_fixture(f"rejected/{fixture}"))

    assert status == 422, answer
    assert names in answer["detail"]
    assert "X-Amz-Signature" not in answer["detail"]
    _nothing_stored()


@pytest.mark.parametrize("raw", ["{not json", "", "[1, 2", "\ud800"])
def test_body_that_is_not_json_is_400(api: RunStore, raw: str) -> None:
    status, answer = post(raw_body=raw)

    assert status == 400, answer
    assert answer["detail"].startswith("invalid request: body")
    _nothing_stored()


def test_wrong_field_types_are_422(api: RunStore) -> None:
    body = _fixture("webhook_full.json") | {"scan_urls": {"5550001": "not-a-list"}}

    status, answer = post(body)

    assert status == 422
    assert "scan_urls.5550001" in answer["detail"]
    _nothing_stored()


def test_wrong_key_is_404_and_touches_nothing(api: RunStore) -> None:
    status, answer = post(_fixture("webhook_full.json"), path="/hooks/techcyte/not-the-key")

    assert status == 404
    assert answer == {"detail": "not found"}
    _nothing_stored()


def test_url_whose_host_is_not_allowed_is_refused_naming_scan_and_host(api: RunStore) -> None:
    body = _fixture("webhook_full.json")
    body["scan_urls"]["5550002"][1] = "https://attacker.example.net/files_uuid/x.1?X-Amz-Signature=zzz"

    status, answer = post(body)

    assert status == 403, answer
    assert "scan 5550002" in answer["detail"]
    assert "attacker.example.net" in answer["detail"]
    assert "zzz" not in answer["detail"]
    _nothing_stored()


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://bucket.s3.us-west-2.amazonaws.com/files_uuid/ab12.77",  # plain http to an https-only host
        "file:///etc/passwd",
    ],
)
def test_metadata_plain_http_and_file_urls_are_refused(api: RunStore, url: str) -> None:
    body = _fixture("webhook_full.json")
    body["scan_urls"]["5550001"] = [url]

    status, _ = post(body)

    assert status == 403
    _nothing_stored()


def test_unknown_model_is_400_naming_it_and_the_known_ones(api: RunStore) -> None:
    body = _fixture("webhook_full.json") | {"model_name": "prostate-grading"}

    status, answer = post(body)

    assert status == 400
    assert "prostate-grading" in answer["detail"]
    assert "he-tissue" in answer["detail"]
    _nothing_stored()
