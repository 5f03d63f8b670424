"""The Platform API operations beyond create/get/list, through the real ``api`` handler with moto.

Applications and version details, cancel, delete artifacts, run and item custom metadata with
checksums (412), ``/me``, the OpenAPI document, the metadata_schema 422, scheduling, and the
deadline sweep. Responses are also parsed with the 1.6.0 client's own models (``aignx.codegen``),
which are strict: a shape they reject would break the SDK.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from aignx.codegen import models as client_models
from openapi_spec_validator import validate as validate_openapi

from lambdas.api import deps
from lambdas.api.handler import app
from lambdas.scheduler.handler import handler as scheduler_handler
from slidebridge.errors import ConflictError
from slidebridge.launcher import JobLauncher
from slidebridge.platform import CustomMetadataUpdateRequest, RunCreationRequest, custom_metadata_checksum
from slidebridge.runs import (
    ArtifactMetadata,
    InputArtifact,
    Item,
    ItemState,
    ItemTerminationReason,
    OutputArtifact,
    Run,
    RunState,
    RunTerminationReason,
    Scheduling,
)
from slidebridge.scheduling import DEADLINE_ERROR_CODE, cancel_overdue_runs, close_unlaunched_runs
from slidebridge.settings import get_settings
from slidebridge.store import RunStore
from tests.apigw import LambdaContext
from tests.integration.conftest import BUCKET, TABLE, TOKEN
from tests.integration.test_platform_api import call, run_body

OTHER_TOKEN = "other-org-token-9876543210"
UNKNOWN_RUN = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
def api(batch_api: None, monkeypatch: pytest.MonkeyPatch) -> RunStore:
    monkeypatch.setenv("SLIDEBRIDGE_DOWNLOAD_HOSTS", "slides.example.org")
    store = RunStore(TABLE)
    store.register_api_token(TOKEN, user_id="user-1", organization_id="org-a")
    store.register_api_token(OTHER_TOKEN, user_id="user-2", organization_id="org-b")
    return store


def create_run(**overrides: Any) -> str:
    status, _, body = call("POST", "/api/v1/runs", body=run_body(**overrides))
    assert status == 201, body
    run_id: str = body["run_id"]
    return run_id


def finish_item(store: RunStore, run_id: str, index: int = 0) -> OutputArtifact:
    """Let the item succeed with one artifact whose file is in S3 (what the job does)."""
    key = f"artifacts/{run_id}/{index}/summary.json"
    boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=b"{}")
    artifact = OutputArtifact(
        name="summary:json",
        s3_key=key,
        metadata=ArtifactMetadata(media_type="application/json", size_bytes=2, checksum_base64_crc32c="AAAAAA=="),
    )
    store.transition_item(run_id, index, ItemState.PROCESSING)
    store.transition_item(
        run_id, index, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED, output_artifacts=[artifact]
    )
    return artifact


def two_item_body() -> dict[str, Any]:
    body = run_body()
    second = json.loads(json.dumps(body["items"][0]))
    second["external_id"] = "folder/slide_002.svs"
    body["items"].append(second)
    return body


# --- applications ------------------------------------------------------------------------------


def test_application_by_id_lists_its_versions_in_the_client_shape(api: RunStore) -> None:
    status, _, body = call("GET", "/api/v1/applications/he-tissue")
    assert status == 200
    parsed = client_models.ApplicationReadResponse.from_dict(body)
    assert parsed is not None
    assert [v.number for v in parsed.versions] == ["1.0.0"]
    assert parsed.regulatory_classes == ["RUO"]


def test_version_details_carry_artifact_definitions_with_a_real_metadata_schema(api: RunStore) -> None:
    status, _, body = call("GET", "/api/v1/applications/he-tissue/versions/1.0.0")
    assert status == 200
    parsed = client_models.VersionReadResponse.from_dict(body)
    assert parsed is not None
    assert parsed.changelog
    [wsi] = parsed.input_artifacts
    assert wsi.name == "whole_slide_image"
    assert wsi.metadata_schema["required"] == ["checksum_base64_crc32c"]
    assert {(o.name, o.mime_type, o.scope.value, o.visibility.value) for o in parsed.output_artifacts} == {
        ("tissue:geojson", "application/geo+json", "ITEM", "EXTERNAL"),
        ("tiles:csv", "text/csv", "ITEM", "EXTERNAL"),
        ("heatmap:png", "image/png", "ITEM", "EXTERNAL"),
        ("summary:json", "application/json", "ITEM", "EXTERNAL"),
    }


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/v1/applications/no-such-app", 404),
        ("/api/v1/applications/no-such-app/versions/1.0.0", 404),
        ("/api/v1/applications/he-tissue/versions/9.9.9", 404),
        ("/api/v1/applications/he-tissue/versions/v1.0", 422),
    ],
)
def test_unknown_applications_and_versions(api: RunStore, path: str, status: int) -> None:
    code, _, body = call("GET", path)
    assert code == status, body
    if status == 422:
        assert body["detail"][0]["loc"] == ["path", "version"]


# --- POST /runs: metadata_schema and scheduling --------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"width_px": 1000}, "checksum_base64_crc32c"),
        ({"checksum_base64_crc32c": "mnG7TA==", "width_px": "wide"}, "width_px"),
        ({"checksum_base64_crc32c": "not a crc"}, "checksum_base64_crc32c"),
        ({"checksum_base64_crc32c": "mnG7TA==", "resolution_mpp": 0}, "resolution_mpp"),
    ],
)
def test_metadata_failing_the_schema_is_422_naming_item_and_field(
    api: RunStore, metadata: dict[str, Any], field: str
) -> None:
    body = two_item_body()
    body["items"][1]["input_artifacts"][0]["metadata"] = metadata
    status, _, error = call("POST", "/api/v1/runs", body=body)
    assert status == 422, error
    [entry] = error["detail"]
    assert entry["loc"] == ["body", "items", 1, "input_artifacts", 0, "metadata", field]
    assert "folder/slide_002.svs" in entry["msg"]
    assert field in entry["msg"]
    # The client parses 422 bodies with its HTTPValidationError model.
    assert client_models.HTTPValidationError.from_dict(error) is not None
    assert list(api.iter_runs("org-a")) == []


def test_both_media_type_spellings_pass_the_schema(api: RunStore) -> None:
    body = two_item_body()
    body["items"][0]["input_artifacts"][0]["metadata"]["media_type"] = "image/tiff"
    body["items"][1]["input_artifacts"][0]["metadata"].pop("media_type")
    body["items"][1]["input_artifacts"][0]["metadata"]["media-type"] = "image/tiff"
    assert call("POST", "/api/v1/runs", body=body)[0] == 201


def test_scheduling_is_stored_and_returned(api: RunStore) -> None:
    due = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    deadline = due + timedelta(hours=1)
    # A time without an offset is read as UTC.
    scheduling = {"due_date": due.isoformat(), "deadline": deadline.replace(tzinfo=None).isoformat()}
    run_id = create_run(scheduling=scheduling)
    _, _, run = call("GET", f"/api/v1/runs/{run_id}")
    parsed = client_models.RunReadResponse.from_dict(run)
    assert parsed is not None and parsed.scheduling is not None
    assert parsed.scheduling.due_date == due
    assert parsed.scheduling.deadline == deadline


@pytest.mark.parametrize(
    ("due", "deadline", "message"),
    [
        (None, -60, "deadline must be in the future"),
        (7200, 3600, "due_date must not be later than deadline"),
    ],
)
def test_inconsistent_scheduling_is_422(api: RunStore, due: int | None, deadline: int, message: str) -> None:
    now = datetime.now(UTC)
    scheduling = {
        "due_date": (now + timedelta(seconds=due)).isoformat() if due is not None else None,
        "deadline": (now + timedelta(seconds=deadline)).isoformat(),
    }
    status, _, error = call("POST", "/api/v1/runs", body=run_body(scheduling=scheduling))
    assert status == 422
    assert error["detail"][0]["loc"] == ["body", "scheduling"]
    assert message in error["detail"][0]["msg"]


# --- cancel --------------------------------------------------------------------------------------


def test_cancel_is_202_then_409_and_skips_open_items_keeping_finished_ones(api: RunStore) -> None:
    status, _, created = call("POST", "/api/v1/runs", body=two_item_body())
    assert status == 201
    run_id = created["run_id"]
    artifact = finish_item(api, run_id, 0)

    status, headers, body = call("POST", f"/api/v1/runs/{run_id}/cancel")
    assert (status, body) == (202, None)
    assert headers["content-type"] == "application/json"

    _, _, run = call("GET", f"/api/v1/runs/{run_id}")
    assert (run["state"], run["termination_reason"], run["output"]) == ("TERMINATED", "CANCELED_BY_USER", "PARTIAL")
    assert run["statistics"]["item_skipped_count"] == 1
    assert run["statistics"]["item_succeeded_count"] == 1
    _, _, items = call("GET", f"/api/v1/runs/{run_id}/items")
    assert [(i["state"], i["termination_reason"]) for i in items] == [
        ("TERMINATED", "SUCCEEDED"),
        ("TERMINATED", "SKIPPED"),
    ]
    # The finished item's artifact stays downloadable.
    assert call("GET", f"/api/v1/runs/{run_id}/artifacts/{artifact.output_artifact_id}/file")[0] == 307

    status, _, error = call("POST", f"/api/v1/runs/{run_id}/cancel")
    assert status == 409
    assert "already cancelled" in error["detail"]


def test_cancel_of_a_finished_run_is_409(api: RunStore) -> None:
    run_id = create_run()
    finish_item(api, run_id)
    status, _, error = call("POST", f"/api/v1/runs/{run_id}/cancel")
    assert status == 409
    assert "already finished" in error["detail"]
    assert api.get_run(run_id).termination_reason is RunTerminationReason.ALL_ITEMS_PROCESSED


def test_cancel_of_another_organisations_run_is_404_and_changes_nothing(api: RunStore) -> None:
    run_id = create_run()
    assert call("POST", f"/api/v1/runs/{run_id}/cancel", token=OTHER_TOKEN)[0] == 404
    assert call("POST", f"/api/v1/runs/{UNKNOWN_RUN}/cancel")[0] == 404
    assert call("POST", "/api/v1/runs/not-a-uuid/cancel")[0] == 422
    assert api.get_run(run_id).state is RunState.PENDING


# --- delete artifacts ----------------------------------------------------------------------------


def test_delete_artifacts_only_once_terminated_then_deleted_by_user_and_410(api: RunStore) -> None:
    status, _, created = call("POST", "/api/v1/runs", body=two_item_body())
    run_id = created["run_id"]
    artifact = finish_item(api, run_id, 0)
    s3 = boto3.client("s3")

    status, _, error = call("DELETE", f"/api/v1/runs/{run_id}/artifacts")
    assert status == 409, error
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=f"artifacts/{run_id}/")["KeyCount"] == 1

    assert call("POST", f"/api/v1/runs/{run_id}/cancel")[0] == 202
    status, _, body = call("DELETE", f"/api/v1/runs/{run_id}/artifacts")
    assert (status, body) == (200, None)

    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=f"artifacts/{run_id}/")["KeyCount"] == 0
    _, _, item = call("GET", f"/api/v1/runs/{run_id}/items/slide_001.svs")
    [shown] = item["output_artifacts"]
    assert shown["output"] == "DELETED_BY_USER"
    assert shown["metadata"] is None  # "can only be None if the artifact itself was deleted"
    assert client_models.ItemResultReadResponse.from_dict(item) is not None
    status, _, error = call("GET", f"/api/v1/runs/{run_id}/artifacts/{artifact.output_artifact_id}/file")
    assert status == 410
    assert "deleted" in error["detail"]
    # Deleting again is harmless (a retry after a failure half-way).
    assert call("DELETE", f"/api/v1/runs/{run_id}/artifacts")[0] == 200


@pytest.mark.parametrize(("days_ago", "expired"), [(29, False), (31, True)])
def test_artifacts_past_retention_show_deleted_by_system_and_410(
    api: RunStore, monkeypatch: pytest.MonkeyPatch, days_ago: int, expired: bool
) -> None:
    """The bucket's lifecycle removes artifact files after SLIDEBRIDGE_ARTIFACTS_RETENTION_DAYS (30); the
    API must not keep handing out URLs to files S3 has dropped."""
    monkeypatch.setenv("SLIDEBRIDGE_ARTIFACTS_RETENTION_DAYS", "30")
    get_settings.cache_clear()
    deps.reset()
    run_id = create_run()
    artifact = finish_item(api, run_id)
    ended = datetime.now(UTC) - timedelta(days=days_ago)
    api.update_item(run_id, 0, lambda item: item.model_copy(update={"terminated_at": ended}))

    _, _, items = call("GET", f"/api/v1/runs/{run_id}/items")
    [shown] = items[0]["output_artifacts"]
    status, _, error = call("GET", f"/api/v1/runs/{run_id}/artifacts/{artifact.output_artifact_id}/file")
    if expired:
        assert shown["output"] == "DELETED_BY_SYSTEM"
        assert shown["metadata"] is None
        assert status == 410
        assert "DELETED_BY_SYSTEM" in error["detail"]
    else:
        assert shown["output"] == "AVAILABLE"
        assert shown["metadata"]["media_type"] == "application/json"
        assert status == 307
    assert client_models.ItemResultReadResponse.from_dict(items[0]) is not None
    # Only the view changes: the stored record still says what the job wrote.
    assert api.get_item(run_id, 0).output_artifacts[0].output.value == "AVAILABLE"


def test_delete_artifacts_of_another_organisations_run_is_404(api: RunStore) -> None:
    run_id = create_run()
    finish_item(api, run_id)
    assert call("DELETE", f"/api/v1/runs/{run_id}/artifacts", token=OTHER_TOKEN)[0] == 404
    assert api.list_items(run_id)[0].output_artifacts[0].output.value == "AVAILABLE"


# --- custom metadata -----------------------------------------------------------------------------


def test_run_custom_metadata_checksum_round_trip_and_412_on_a_stale_one(api: RunStore) -> None:
    run_id = create_run()
    _, _, run = call("GET", f"/api/v1/runs/{run_id}")
    first = run["custom_metadata_checksum"]
    assert first == custom_metadata_checksum({"study": "s1", "sdk": {"version": "1.6.0"}})
    assert len(first) == 8

    status, _, body = call(
        "PUT",
        f"/api/v1/runs/{run_id}/custom-metadata",
        body={"custom_metadata": {"study": "s2"}, "custom_metadata_checksum": first},
    )
    assert status == 200
    second = body["custom_metadata_checksum"]
    assert second != first
    _, _, run = call("GET", f"/api/v1/runs/{run_id}")
    assert (run["custom_metadata"], run["custom_metadata_checksum"]) == ({"study": "s2"}, second)

    # Someone still holding the first checksum cannot overwrite.
    status, _, error = call(
        "PUT",
        f"/api/v1/runs/{run_id}/custom-metadata",
        body={"custom_metadata": {"study": "stale"}, "custom_metadata_checksum": first},
    )
    assert status == 412
    assert "changed" in error["detail"]
    assert api.get_run(run_id).custom_metadata == {"study": "s2"}

    # Without a checksum the write is unconditional; null clears the metadata (and its checksum).
    status, _, body = call("PUT", f"/api/v1/runs/{run_id}/custom-metadata", body={"custom_metadata": {"x": 1}})
    assert (status, body["custom_metadata_checksum"]) == (200, custom_metadata_checksum({"x": 1}))
    status, _, body = call(
        "PUT",
        f"/api/v1/runs/{run_id}/custom-metadata",
        body={"custom_metadata": None, "custom_metadata_checksum": None},
    )
    assert (status, body) == (200, {"custom_metadata_checksum": None})
    assert api.get_run(run_id).custom_metadata is None


def test_custom_metadata_checksum_depends_only_on_the_value() -> None:
    assert custom_metadata_checksum({"a": 1, "b": [1, 2]}) == custom_metadata_checksum({"b": [1, 2], "a": 1})
    assert custom_metadata_checksum({"a": 1}) != custom_metadata_checksum({"a": 2})
    assert custom_metadata_checksum(None) is None


def test_a_concurrent_write_between_read_and_write_is_caught_not_lost(
    api: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = create_run()
    checksum = custom_metadata_checksum(api.get_run(run_id).custom_metadata)
    other_writer = RunStore(TABLE)
    original_get_run = RunStore.get_run
    reads = {"n": 0}

    def get_run_with_a_race(self: RunStore, wanted: str) -> Run:
        run = original_get_run(self, wanted)
        reads["n"] += 1
        if self is not other_writer and reads["n"] == 2:
            # Right after the update read the run, another client writes new metadata.
            other_writer.update_run(wanted, lambda r: r.model_copy(update={"custom_metadata": {"by": "other"}}))
        return run

    monkeypatch.setattr(RunStore, "get_run", get_run_with_a_race)
    status, _, _ = call(
        "PUT",
        f"/api/v1/runs/{run_id}/custom-metadata",
        body={"custom_metadata": {"by": "me"}, "custom_metadata_checksum": checksum},
    )
    monkeypatch.setattr(RunStore, "get_run", original_get_run)
    assert status == 412
    assert api.get_run(run_id).custom_metadata == {"by": "other"}


def test_item_custom_metadata_by_percent_encoded_external_id(api: RunStore) -> None:
    _, _, created = call("POST", "/api/v1/runs", body=two_item_body())
    run_id = created["run_id"]
    path = f"/api/v1/runs/{run_id}/items/folder%2Fslide_002.svs"
    _, _, item = call("GET", path)
    assert item["external_id"] == "folder/slide_002.svs"
    assert item["custom_metadata_checksum"] is None

    status, _, body = call("PUT", f"{path}/custom-metadata", body={"custom_metadata": {"score": 0.8}})
    assert status == 200
    checksum = body["custom_metadata_checksum"]
    _, _, item = call("GET", path)
    assert (item["custom_metadata"], item["custom_metadata_checksum"]) == ({"score": 0.8}, checksum)
    _, _, items = call("GET", f"/api/v1/runs/{run_id}/items")
    assert items[0]["custom_metadata"] is None  # only that item changed

    status, _, _ = call(
        "PUT", f"{path}/custom-metadata", body={"custom_metadata": {"score": 0.1}, "custom_metadata_checksum": "0000"}
    )
    assert status == 412
    assert call("PUT", f"/api/v1/runs/{run_id}/items/nope.svs/custom-metadata", body={"custom_metadata": {}})[0] == 404
    assert call("PUT", f"{path}/custom-metadata", body={"custom_metadata": {}}, token=OTHER_TOKEN)[0] == 404


@pytest.mark.parametrize(
    "body",
    [
        {"custom_metadata": ["not", "an", "object"]},
        {"custom_metadata": {}, "custom_metadata_checksum": 5},
    ],
)
def test_custom_metadata_shape_errors_are_422(api: RunStore, body: dict[str, Any]) -> None:
    run_id = create_run()
    status, _, error = call("PUT", f"/api/v1/runs/{run_id}/custom-metadata", body=body)
    assert status == 422
    assert error["detail"][0]["loc"][0] == "body"


# --- /me -----------------------------------------------------------------------------------------


def test_me_reports_the_tokens_user_and_organisation_and_no_credentials(api: RunStore) -> None:
    status, _, body = call("GET", "/api/v1/me")
    assert status == 200
    me = client_models.MeReadResponse.from_dict(body)
    assert me is not None
    assert me.user.id == "user-1"
    assert me.organization.id == "org-a"
    assert me.organization.aignostics_bucket_hmac_secret_access_key == ""
    _, _, other = call("GET", "/api/v1/me", token=OTHER_TOKEN)
    assert (other["user"]["id"], other["organization"]["id"]) == ("user-2", "org-b")
    assert call("GET", "/api/v1/me", token=None)[0] == 401


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/me"),
        ("GET", "/api/v1/applications/he-tissue"),
        ("GET", "/api/v1/applications/he-tissue/versions/1.0.0"),
        ("POST", f"/api/v1/runs/{UNKNOWN_RUN}/cancel"),
        ("DELETE", f"/api/v1/runs/{UNKNOWN_RUN}/artifacts"),
        ("PUT", f"/api/v1/runs/{UNKNOWN_RUN}/custom-metadata"),
        ("PUT", f"/api/v1/runs/{UNKNOWN_RUN}/items/x/custom-metadata"),
    ],
)
def test_every_new_operation_needs_a_token(api: RunStore, method: str, path: str) -> None:
    assert call(method, path, token=None, body={})[0] == 401
    assert call(method, path, token="wrong", body={})[0] == 401


# --- OpenAPI ------------------------------------------------------------------------------------


def test_openapi_document_is_valid_and_covers_every_platform_route(api: RunStore) -> None:
    status, headers, doc = call("GET", "/api/v1/openapi.json", token=None)
    assert status == 200
    assert headers["content-type"] == "application/json"
    validate_openapi(doc)  # raises on an invalid OpenAPI 3.1 document
    served = {
        (route.method.lower(), route.openapi_path)
        for route in app._static_routes + app._dynamic_routes
        if route.path.startswith("/api/v1/")
    }
    documented = {(method, path) for path, operations in doc["paths"].items() for method in operations}
    assert served == documented
    assert len(documented) == 15  # the 14 operations of v1.4.0 and the document itself


def test_openapi_schemas_are_the_validating_models(api: RunStore) -> None:
    _, _, doc = call("GET", "/api/v1/openapi.json", token=None)
    schemas = doc["components"]["schemas"]
    create = doc["paths"]["/api/v1/runs"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RunCreationRequest"
    }
    assert set(schemas["RunCreationRequest"]["properties"]) == set(RunCreationRequest.model_fields)
    assert set(schemas["CustomMetadataUpdateRequest"]["properties"]) == set(CustomMetadataUpdateRequest.model_fields)
    assert set(create["responses"]) == {"201", "400", "401", "404", "422"}
    assert set(doc["paths"]["/api/v1/runs/{run_id}/cancel"]["post"]["responses"]) >= {"202", "404", "409"}
    assert "307" in doc["paths"]["/api/v1/runs/{run_id}/artifacts/{artifact_id}/file"]["get"]["responses"]
    # Every field the client requires of a run is promised by the document.
    required_by_client = {
        name for name, info in client_models.RunReadResponse.model_fields.items() if info.is_required()
    }
    assert required_by_client <= set(schemas["RunReadResponse"]["required"])


# --- deadlines -----------------------------------------------------------------------------------


class RecordingLauncher:
    def __init__(self) -> None:
        self.cancelled: list[tuple[str, str]] = []

    def submit(self, run_id: str, item_count: int) -> str:
        return f"job-{run_id}"

    def cancel(self, job_id: str, reason: str) -> None:
        self.cancelled.append((job_id, reason))


def stored_run(store: RunStore, *, deadline: datetime | None, items: int = 1) -> Run:
    run = Run(
        application_id="he-tissue",
        version_number="1.0.0",
        organization_id="org-a",
        submitted_by="user-1",
        scheduling=Scheduling(deadline=deadline) if deadline else None,
        job_id=None,
    )
    stored = store.create_run(
        run,
        [
            Item(
                run_id=run.run_id,
                index=i,
                external_id=f"s{i}.svs",
                input_artifacts=[InputArtifact(name="whole_slide_image", download_url="http://127.0.0.1:9/x")],
            )
            for i in range(items)
        ],
    )
    store.set_job_id(run.run_id, f"job-{run.run_id}")
    return stored


def test_sweep_cancels_open_runs_past_their_deadline_by_the_system(
    store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.now(UTC)
    overdue = stored_run(store, deadline=now - timedelta(minutes=1), items=2)
    store.transition_item(overdue.run_id, 0, ItemState.PROCESSING)
    store.transition_item(overdue.run_id, 0, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED)
    not_yet = stored_run(store, deadline=now + timedelta(hours=1))
    no_deadline = stored_run(store, deadline=None)
    finished = stored_run(store, deadline=now - timedelta(minutes=2))
    store.transition_item(finished.run_id, 0, ItemState.TERMINATED, reason=ItemTerminationReason.USER_ERROR)

    def no_scans(**_: Any) -> None:
        raise AssertionError("the sweep must not scan the table")

    monkeypatch.setattr(store.client, "scan", no_scans)
    launcher = RecordingLauncher()
    cancelled = cancel_overdue_runs(store, launcher, now=now)

    assert [run.run_id for run in cancelled] == [overdue.run_id]
    run = store.get_run(overdue.run_id)
    assert (run.state, run.termination_reason, run.error_code) == (
        RunState.TERMINATED,
        RunTerminationReason.CANCELED_BY_SYSTEM,
        DEADLINE_ERROR_CODE,
    )
    assert run.error_message is not None and "deadline" in run.error_message
    assert [i.termination_reason for i in store.list_items(overdue.run_id)] == [
        ItemTerminationReason.SUCCEEDED,  # finished items keep their results
        ItemTerminationReason.SKIPPED,
    ]
    assert [job for job, _ in launcher.cancelled] == [f"job-{overdue.run_id}"]
    assert store.get_run(not_yet.run_id).state is RunState.PENDING
    assert store.get_run(no_deadline.run_id).state is RunState.PENDING
    assert store.get_run(finished.run_id).termination_reason is RunTerminationReason.ALL_ITEMS_PROCESSED
    # Handled deadlines are forgotten: the next sweep has nothing to do.
    assert list(store.due_deadlines(now)) == []
    assert cancel_overdue_runs(store, launcher, now=now) == []
    # The later deadline comes due in its time.
    later = now + timedelta(hours=2)
    assert [r.run_id for r in cancel_overdue_runs(store, launcher, now=later)] == [not_yet.run_id]


def test_one_run_failing_to_cancel_does_not_stop_the_sweep(store: RunStore) -> None:
    now = datetime.now(UTC)
    first = stored_run(store, deadline=now - timedelta(minutes=2))
    second = stored_run(store, deadline=now - timedelta(minutes=1))

    class FlakyLauncher(RecordingLauncher):
        def cancel(self, job_id: str, reason: str) -> None:
            if job_id == f"job-{first.run_id}":
                raise ConflictError("batch said no")
            super().cancel(job_id, reason)

    launcher: JobLauncher = FlakyLauncher()
    assert [r.run_id for r in cancel_overdue_runs(store, launcher, now=now)] == [second.run_id]
    assert store.get_run(first.run_id).state is RunState.PENDING
    # Its deadline record stays, so the next sweep tries again.
    assert list(store.due_deadlines(now)) == [first.run_id]


def test_the_scheduler_lambda_cancels_overdue_runs(api: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    deadline = datetime.now(UTC) + timedelta(minutes=10)
    run_id = create_run(scheduling={"deadline": deadline.isoformat()})
    idle = {"cancelled": 0, "never_started": 0}
    assert scheduler_handler({"source": "aws.events"}, LambdaContext()) == idle  # type: ignore[arg-type]
    monkeypatch.setattr("slidebridge.scheduling.utcnow", lambda: deadline + timedelta(seconds=1))
    assert scheduler_handler({"source": "aws.events"}, LambdaContext()) == {  # type: ignore[arg-type]
        "cancelled": 1,
        "never_started": 0,  # its job was submitted: the run is not one left without a job
    }
    _, _, run = call("GET", f"/api/v1/runs/{run_id}")
    assert (run["termination_reason"], run["error_code"]) == ("CANCELED_BY_SYSTEM", DEADLINE_ERROR_CODE)


# --- runs that never got a job -------------------------------------------------------------------


def _unlaunched_run(store: RunStore, *, submitted_at: datetime, items: int = 2) -> Run:
    """A run as left by a request cut short between recording it and submitting its job."""
    run = Run(
        application_id="he-tissue",
        version_number="1.0.0",
        organization_id="org-a",
        submitted_by="user-1",
        submitted_at=submitted_at,
    )
    return store.create_run(run, [Item(run_id=run.run_id, index=i, external_id=f"s{i}.svs") for i in range(items)])


def test_the_sweep_closes_runs_left_without_a_job_and_tells_why(
    store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.now(UTC)
    settings = get_settings()
    grace = timedelta(seconds=settings.launch_grace_s)
    stranded = _unlaunched_run(store, submitted_at=now - grace - timedelta(minutes=1))
    recent = _unlaunched_run(store, submitted_at=now - timedelta(minutes=1))  # its request may still run
    launched = stored_run(store, deadline=None)  # job id recorded (its launch record outlived it)

    def no_scans(**_: Any) -> None:
        raise AssertionError("the sweep must not scan the table")

    monkeypatch.setattr(store.client, "scan", no_scans)
    later = now + grace + timedelta(minutes=1)
    assert close_unlaunched_runs(store, settings, now=now) == [stranded.run_id]

    run = store.get_run(stranded.run_id)
    assert (run.state, run.termination_reason) == (RunState.TERMINATED, RunTerminationReason.ALL_ITEMS_PROCESSED)
    items = store.list_items(stranded.run_id)
    assert {(i.termination_reason, i.error_code) for i in items} == {(ItemTerminationReason.SYSTEM_ERROR, "JOB_FAILED")}
    assert all(i.error_message is not None and "never started" in i.error_message for i in items)
    # The others: too recent to judge, or fine; the run with a job keeps going.
    assert store.get_run(recent.run_id).state is RunState.PENDING
    assert store.get_run(launched.run_id).state is RunState.PENDING
    assert close_unlaunched_runs(store, settings, now=now) == []  # handled records are gone
    assert close_unlaunched_runs(store, settings, now=later) == [recent.run_id]
    assert list(store.due_launches(later)) == []


def test_the_scheduler_lambda_closes_them_and_logs_what_the_alarm_matches(
    api: RunStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from infra.monitoring import NEVER_STARTED_LOG_MESSAGE  # noqa: PLC0415 - the alarm's side of the contract

    stranded = _unlaunched_run(api, submitted_at=datetime.now(UTC))
    later = datetime.now(UTC) + timedelta(seconds=get_settings().launch_grace_s + 1)
    monkeypatch.setattr("slidebridge.scheduling.utcnow", lambda: later)
    assert scheduler_handler({"source": "aws.events"}, LambdaContext()) == {  # type: ignore[arg-type]
        "cancelled": 0,
        "never_started": 1,
    }
    # Powertools writes record.getMessage() as the JSON line's "message", which the metric filter matches.
    [logged] = [r for r in caplog.records if r.getMessage() == NEVER_STARTED_LOG_MESSAGE]
    assert logged.levelname == "ERROR"
    assert logged.run_ids == [stranded.run_id]


def test_a_submitted_job_removes_the_launch_record(api: RunStore) -> None:
    run_id = create_run()
    assert api.get_run(run_id).job_id is not None
    assert list(api.due_launches(datetime.now(UTC) + timedelta(days=1))) == []


def test_the_job_itself_ends_a_run_whose_deadline_passed_in_the_queue(
    store: RunStore, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_job.__main__ import main  # noqa: PLC0415 - the job's imports are heavy

    monkeypatch.setenv("SLIDEBRIDGE_SCRATCH_DIR", str(tmp_path / "scratch"))
    get_settings.cache_clear()
    run = stored_run(store, deadline=datetime.now(UTC) - timedelta(seconds=1), items=2)
    assert main([run.run_id]) == 0
    ended = store.get_run(run.run_id)
    assert (ended.termination_reason, ended.error_code) == (
        RunTerminationReason.CANCELED_BY_SYSTEM,
        DEADLINE_ERROR_CODE,
    )
    assert {i.termination_reason for i in store.list_items(run.run_id)} == {ItemTerminationReason.SKIPPED}
