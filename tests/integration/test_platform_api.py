"""Platform API first slice through the real ``api`` handler, with moto for DynamoDB, S3 and Batch."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest

from lambdas.api import deps
from lambdas.api.handler import handler
from slidebridge.runs import ArtifactMetadata, ItemState, ItemTerminationReason, OutputArtifact
from slidebridge.store import RunStore
from tests.apigw import LambdaContext, api_event
from tests.integration.conftest import BUCKET, TABLE, TOKEN

CRC = "mnG7TA=="
SLIDE_URL = "https://slides.example.org/bucket/slide-1?X-Amz-Signature=abc"


@pytest.fixture
def api(batch_api: None, monkeypatch: pytest.MonkeyPatch) -> RunStore:
    monkeypatch.setenv("SLIDEBRIDGE_DOWNLOAD_HOSTS", "slides.example.org")
    store = RunStore(TABLE)
    store.register_api_token(TOKEN, user_id="user-1", organization_id="org-a")
    return store


def call(method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    kwargs.setdefault("token", TOKEN)
    response = handler(api_event(method, path, **kwargs), LambdaContext())  # type: ignore[arg-type]
    headers = {k.lower(): v for k, v in (response.get("headers") or {}).items()}
    for k, values in (response.get("multiValueHeaders") or {}).items():
        headers.setdefault(k.lower(), values[-1])
    body = json.loads(response["body"]) if response.get("body") else None
    return response["statusCode"], headers, body


def run_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "application_id": "he-tissue",
        "version_number": "1.0.0",
        "custom_metadata": {"study": "s1", "sdk": {"version": "1.6.0"}},
        "scheduling": None,
        "callback_context": None,
        "items": [
            {
                "external_id": "slide_001.svs",
                "custom_metadata": None,
                "input_artifacts": [
                    {
                        "name": "whole_slide_image",
                        "download_url": SLIDE_URL,
                        "metadata": {"checksum_base64_crc32c": CRC, "width_px": 1000, "media_type": "image/tiff"},
                    }
                ],
            }
        ],
    }
    body.update(overrides)
    return body


def _jobs() -> list[dict[str, Any]]:
    batch = boto3.client("batch")
    queue = batch.describe_job_queues()["jobQueues"][0]["jobQueueArn"]
    jobs: list[dict[str, Any]] = []
    for status in ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED"):
        jobs.extend(batch.list_jobs(jobQueue=queue, jobStatus=status)["jobSummaryList"])
    return jobs


def _stored_records() -> int:
    records = boto3.client("dynamodb").scan(TableName=TABLE)["Items"]
    return sum(1 for r in records if not r["pk"]["S"].startswith(("TOKEN#", "TOKENORG#")))


def test_create_run_answers_201_and_submits_one_job_with_only_the_run_id(api: RunStore) -> None:
    status, headers, body = call("POST", "/api/v1/runs", body=run_body())
    assert status == 201, body
    assert headers["content-type"] == "application/json"
    run_id = body["run_id"]
    jobs = _jobs()
    assert len(jobs) == 1
    job = boto3.client("batch").describe_jobs(jobs=[jobs[0]["jobId"]])["jobs"][0]
    assert job["parameters"] == {"run_id": run_id}
    assert SLIDE_URL not in json.dumps(job, default=str)
    assert api.get_run(run_id).job_id == jobs[0]["jobId"]


def test_run_with_several_items_is_an_array_job(api: RunStore) -> None:
    body = run_body()
    second = json.loads(json.dumps(body["items"][0]))
    second["external_id"] = "slide_002.svs"
    body["items"].append(second)
    status, _, created = call("POST", "/api/v1/runs", body=body)
    assert status == 201
    job = boto3.client("batch").describe_jobs(jobs=[_jobs()[0]["jobId"]])["jobs"][0]
    assert job["arrayProperties"]["size"] == 2
    assert job["parameters"] == {"run_id": created["run_id"]}


def test_get_run_and_items_have_the_exact_v1_shapes(api: RunStore) -> None:
    _, _, created = call("POST", "/api/v1/runs", body=run_body())
    status, _, run = call("GET", f"/api/v1/runs/{created['run_id']}")
    assert status == 200
    assert run["state"] == "PENDING"
    assert run["output"] == "NONE"
    assert run["termination_reason"] is None
    assert run["statistics"] == {
        "item_count": 1,
        "item_pending_count": 1,
        "item_processing_count": 0,
        "item_user_error_count": 0,
        "item_system_error_count": 0,
        "item_skipped_count": 0,
        "item_succeeded_count": 0,
    }
    assert run["submitted_by"] == "user-1"
    assert run["custom_metadata"] == {"study": "s1", "sdk": {"version": "1.6.0"}}
    assert run["submitted_at"].endswith("Z")
    status, _, items = call("GET", f"/api/v1/runs/{created['run_id']}/items")
    assert status == 200
    assert isinstance(items, list)
    assert len(items) == 1
    item = items[0]
    assert item["external_id"] == "slide_001.svs"
    assert item["state"] == "PENDING"
    assert item["output"] == "NONE"
    assert item["output_artifacts"] == []
    assert item["input_artifacts"][0]["name"] == "whole_slide_image"
    # The caller's presigned URL is a credential: it is never echoed back.
    assert item["input_artifacts"][0]["download_url"] is None


def test_artifact_file_redirects_to_a_presigned_url(api: RunStore) -> None:
    _, _, created = call("POST", "/api/v1/runs", body=run_body())
    run_id = created["run_id"]
    item = api.list_items(run_id)[0]
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"artifacts/{run_id}/x/summary.json", Body=b"{}")
    artifact = OutputArtifact(
        name="summary:json",
        s3_key=f"artifacts/{run_id}/x/summary.json",
        metadata=ArtifactMetadata(media_type="application/json", size_bytes=2, checksum_base64_crc32c="AAAAAA=="),
    )
    api.transition_item(run_id, item.index, ItemState.PROCESSING)
    api.transition_item(
        run_id, item.index, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED, output_artifacts=[artifact]
    )
    status, headers, _ = call("GET", f"/api/v1/runs/{run_id}/artifacts/{artifact.output_artifact_id}/file")
    assert status == 307
    location = headers["location"]
    assert location.startswith("https://")
    assert BUCKET in location
    assert "X-Amz-Signature" in location
    status, _, _ = call("GET", f"/api/v1/runs/{run_id}/artifacts/00000000-0000-4000-8000-000000000000/file")
    assert status == 404


def test_applications_list(api: RunStore) -> None:
    status, _, apps = call("GET", "/api/v1/applications")
    assert status == 200
    assert apps[0]["application_id"] == "he-tissue"
    assert apps[0]["latest_version"]["number"] == "1.0.0"
    assert apps[0]["regulatory_classes"] == ["RUO"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/applications"),
        ("POST", "/api/v1/runs"),
        ("GET", "/api/v1/runs/00000000-0000-4000-8000-000000000000"),
    ],
)
def test_missing_or_bad_token_is_401(api: RunStore, method: str, path: str) -> None:
    assert call(method, path, token=None, body=run_body())[0] == 401
    assert call(method, path, token="wrong", body=run_body())[0] == 401


@pytest.mark.parametrize(
    ("body", "loc", "fragment"),
    [
        (run_body(items=[]), ["body", "items"], "at least 1"),
        ({k: v for k, v in run_body().items() if k != "application_id"}, ["body", "application_id"], "required"),
        (run_body(application_id=5), ["body", "application_id"], "string"),
        (
            run_body(items=[{"external_id": "a", "input_artifacts": [{"name": "whole_slide_image", "metadata": {}}]}]),
            ["body", "items", 0, "input_artifacts", 0, "download_url"],
            "required",
        ),
    ],
)
def test_shape_errors_are_422_with_field_and_reason_and_store_nothing(
    api: RunStore, body: dict[str, Any], loc: list[Any], fragment: str
) -> None:
    status, _, error = call("POST", "/api/v1/runs", body=body)
    assert status == 422
    assert any(e["loc"] == loc and fragment in e["msg"] for e in error["detail"]), error
    assert _stored_records() == 0
    assert _jobs() == []


def test_malformed_json_is_422(api: RunStore) -> None:
    status, _, error = call("POST", "/api/v1/runs", raw_body="{not json")
    assert status == 422
    assert "not valid UTF-8 JSON" in error["detail"][0]["msg"]
    assert _stored_records() == 0


@pytest.mark.parametrize(
    ("mutate", "status_code", "fragment"),
    [
        (lambda b: b.update(application_id="no-such-app"), 404, "no-such-app"),
        (lambda b: b.update(version_number="9.9.9"), 404, "9.9.9"),
        (lambda b: b["items"].append(json.loads(json.dumps(b["items"][0]))), 400, "used twice"),
        (lambda b: b["items"][0]["input_artifacts"][0].update(name="other"), 400, "missing input artifact"),
        (
            lambda b: b["items"][0]["input_artifacts"][0].update(download_url="https://evil.example.com/x"),
            400,
            "download_url",
        ),
        (
            lambda b: b["items"][0]["input_artifacts"][0].update(download_url="http://169.254.169.254/latest"),
            400,
            "download_url",
        ),
    ],
)
def test_rejected_runs_store_nothing_and_submit_nothing(
    api: RunStore, mutate: Any, status_code: int, fragment: str
) -> None:
    body = run_body()
    mutate(body)
    status, _, error = call("POST", "/api/v1/runs", body=body)
    assert status == status_code, error
    assert fragment in error["detail"]
    assert _stored_records() == 0
    assert _jobs() == []


def test_other_organisations_cannot_see_a_run(api: RunStore) -> None:
    _, _, created = call("POST", "/api/v1/runs", body=run_body())
    api.register_api_token("other-org-token", user_id="user-2", organization_id="org-b")
    assert call("GET", f"/api/v1/runs/{created['run_id']}", token="other-org-token")[0] == 404
    assert call("GET", f"/api/v1/runs/{created['run_id']}/items", token="other-org-token")[0] == 404


def test_non_uuid_run_id_is_422(api: RunStore) -> None:
    status, _, error = call("GET", "/api/v1/runs/not-a-uuid")
    assert status == 422
    assert error["detail"][0]["loc"] == ["path", "run_id"]


def test_a_job_that_cannot_start_closes_the_run_for_operators(api: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIDEBRIDGE_JOB_QUEUE", "arn:aws:batch:eu-central-1:123456789012:job-queue/missing")
    deps.reset()
    status, _, error = call("POST", "/api/v1/runs", body=run_body())
    assert status == 500
    assert error == {"detail": "internal error"}
    (run,) = list(api.iter_runs("org-a"))
    assert run.state.value == "TERMINATED"
    assert run.termination_reason is not None
    assert run.termination_reason.value == "CANCELED_BY_SYSTEM"
    assert run.error_code == "JOB_SUBMISSION_FAILED"
    assert run.statistics.item_skipped_count == 1
