"""Contract tests: the official generated client (``aignx.codegen`` from aignostics==1.6.0, unmodified)
against the local stack, for every operation of the v1.4.0 surface, including the 404, 409, 410, 412
and 307 paths.

The client is configured as PLATFORM_API.md §9 shows: ``Configuration(host=<origin>, access_token=…)``
and urllib3 retries with ``redirect=False`` (so the 307 of ``/file`` surfaces with its Location).

The high-level SDK (``aignostics.platform``) cannot be imported here: aignostics is installed with
``--no-deps`` and its import needs loguru, tenacity, sentry-sdk, semver, crc32c, tqdm and more. So
``test_sdk_submission_and_download_protocol`` replays what ``Runs.submit`` and
``Run.download_to_folder`` of 1.6.0 do (§10), step by step, with the generated client and ``requests``
exactly as the SDK calls them.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
import urllib3
from aignx.codegen.api.public_api import PublicApi
from aignx.codegen.api_client import ApiClient
from aignx.codegen.configuration import Configuration
from aignx.codegen.exceptions import (
    ApiException,
    BadRequestException,
    NotFoundException,
    UnauthorizedException,
)
from aignx.codegen.models import (
    ArtifactOutput,
    CustomMetadataUpdateRequest,
    InputArtifactCreationRequest,
    ItemCreationRequest,
    ItemOutput,
    ItemResultReadResponse,
    ItemState,
    RunCreationRequest,
    RunReadResponse,
    RunState,
    SchedulingRequest,
)

from local.demo import SlideFile, upload_slide
from local.stack import DEFAULT_TABLE_NAME, LOCAL_USER_ID, StackProcess
from slidebridge.applications import semver_key
from slidebridge.checksums import Crc32cHasher
from slidebridge.store import RunStore
from tests.e2e.conftest import RUN_TIMEOUT_S

pytestmark = pytest.mark.e2e

UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"
# requests as the SDK uses it, but never through a proxy from the environment (loopback only).
HTTP = requests.Session()
HTTP.trust_env = False
# The SDK's media type → file extension (§10); anything else aborts its download.
SDK_EXTENSIONS = {
    "image/png": ".png",
    "image/tiff": ".tiff",
    "application/vnd.apache.parquet": ".parquet",
    "application/geo+json": ".json",
    "application/json": ".json",
    "text/csv": ".csv",
    "application/zip": ".zip",
}


def public_api(base_url: str, token: str) -> PublicApi:
    cfg = Configuration(host=base_url, access_token=token)
    # Set before ApiClient(cfg): the connection pool is built there. No redirects: /file's 307 stays visible.
    cfg.retries = urllib3.util.Retry(total=3, redirect=False)
    return PublicApi(ApiClient(cfg))


@pytest.fixture(scope="module")
def api(local_stack: StackProcess, api_token: str) -> PublicApi:
    return public_api(local_stack.url, api_token)


@pytest.fixture(scope="module")
def other_org_api(local_stack: StackProcess) -> PublicApi:
    """A client whose token belongs to another organisation (made as the operator CLI makes tokens)."""
    table = local_stack.env.get("SLIDEBRIDGE_TABLE_NAME", DEFAULT_TABLE_NAME)
    store = RunStore(table, client=local_stack.aws_client("dynamodb"))
    token, _ = store.create_api_token(user_id="e2e-contract-other", organization_id="e2e-contract-other-org")
    return public_api(local_stack.url, token)


@pytest.fixture
def stalled_url() -> Iterator[str]:
    """A loopback URL whose server accepts connections and never answers: a run's job waits there."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/slide.tiff"
    finally:
        server.close()


def item(external_id: str, url: str, slide: SlideFile, **metadata: Any) -> ItemCreationRequest:
    return ItemCreationRequest(
        external_id=external_id,
        custom_metadata={"sdk": {"origin": "contract-test"}},
        input_artifacts=[
            InputArtifactCreationRequest(
                name="whole_slide_image", download_url=url, metadata={**slide.metadata(), **metadata}
            )
        ],
    )


def submit(api: PublicApi, items: list[ItemCreationRequest], **kwargs: Any) -> str:
    created = api.create_run_v1_runs_post(
        run_creation_request=RunCreationRequest(
            application_id="he-tissue", version_number="1.0.0", items=items, **kwargs
        )
    )
    # A 200 instead of 201 would make the client return None here.
    assert created is not None
    return str(created.run_id)


def wait_terminated(api: PublicApi, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> RunReadResponse:
    deadline = time.monotonic() + timeout_s
    while True:
        run = api.get_run_v1_runs_run_id_get(run_id=run_id)
        if run.state is RunState.TERMINATED:
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run.state} after {timeout_s:.0f} s"
        time.sleep(1.0)


def location_of(api: PublicApi, run_id: str, artifact_id: str) -> str:
    with pytest.raises(ApiException) as redirect:
        api.get_artifact_url_v1_runs_run_id_artifacts_artifact_id_file_get(run_id=run_id, artifact_id=artifact_id)
    assert redirect.value.status == 307, redirect.value
    assert redirect.value.headers is not None
    location: str = redirect.value.headers["Location"]
    return location


@pytest.fixture(scope="module")
def finished_run(
    api: PublicApi, s3: Any, bucket: str, slide_small: SlideFile, stack_log: Callable[[], str]
) -> tuple[str, list[ItemResultReadResponse]]:
    """One run submitted through the client whose item succeeded: (run id, its items)."""
    url = upload_slide(s3, bucket, slide_small.path, f"slides/contract/{uuid.uuid4()}/slide.tiff")
    run_id = submit(
        api,
        [item("contract/slide small.tiff", url, slide_small)],
        custom_metadata={"study": "contract", "sdk": {"origin": "contract-test"}},
    )
    run = wait_terminated(api, run_id)
    items = api.list_run_items_v1_runs_run_id_items_get(run_id=run_id)
    assert run.output.value == "FULL", (run, items, stack_log())
    return run_id, items


# --- applications --------------------------------------------------------------------------------


def test_applications_list_get_and_version_details(api: PublicApi) -> None:
    apps = api.list_applications_v1_applications_get(page=1, page_size=5, sort=["-name"])
    assert [a.application_id for a in apps] == ["he-tissue"]
    assert apps[0].latest_version is not None and apps[0].latest_version.number == "1.0.0"

    app = api.read_application_by_id_v1_applications_application_id_get(application_id="he-tissue")
    assert [v.number for v in app.versions] == ["1.0.0"]

    version = api.application_version_details_v1_applications_application_id_versions_version_get(
        application_id="he-tissue", version="1.0.0"
    )
    [wsi] = version.input_artifacts
    # The schema the SDK validates against before submitting (it raises SchemaError on a bad schema).
    jsonschema.validators.validator_for(wsi.metadata_schema).check_schema(wsi.metadata_schema)
    assert {o.name for o in version.output_artifacts} == {"tissue:geojson", "tiles:csv", "heatmap:png", "summary:json"}

    with pytest.raises(NotFoundException):
        api.read_application_by_id_v1_applications_application_id_get(application_id="no-such-app")
    with pytest.raises(NotFoundException):
        api.application_version_details_v1_applications_application_id_versions_version_get(
            application_id="he-tissue", version="9.9.9"
        )
    with pytest.raises(ApiException) as bad:
        api.application_version_details_v1_applications_application_id_versions_version_get(
            application_id="he-tissue", version="latest"
        )
    assert bad.value.status == 422


def test_a_bad_token_is_401(local_stack: StackProcess) -> None:
    with pytest.raises(UnauthorizedException):
        public_api(local_stack.url, "not-a-token").list_applications_v1_applications_get()


def test_me(api: PublicApi) -> None:
    me = api.get_me_v1_me_get()
    assert me.user.id == LOCAL_USER_ID
    assert me.organization.id
    assert me.organization.aignostics_bucket_hmac_secret_access_key == ""


# --- runs ----------------------------------------------------------------------------------------


def test_create_run_refusals(api: PublicApi, slide_small: SlideFile) -> None:
    url = "http://127.0.0.1:9/never-fetched.tiff"
    with pytest.raises(NotFoundException):
        api.create_run_v1_runs_post(
            run_creation_request=RunCreationRequest(application_id="no-such-app", items=[item("a", url, slide_small)])
        )
    with pytest.raises(BadRequestException):
        submit(api, [item("same", url, slide_small), item("same", url, slide_small)])
    with pytest.raises(ApiException) as invalid:
        submit(api, [item("fine.tiff", url, slide_small), item("bad.tiff", url, slide_small, width_px="wide")])
    assert invalid.value.status == 422
    [entry] = json.loads(invalid.value.body or "{}")["detail"]
    assert entry["loc"] == ["body", "items", 1, "input_artifacts", 0, "metadata", "width_px"]
    assert "bad.tiff" in entry["msg"]


def test_finished_run_through_every_read_operation(
    api: PublicApi, other_org_api: PublicApi, finished_run: tuple[str, list[ItemResultReadResponse]]
) -> None:
    run_id, items = finished_run
    run = api.get_run_v1_runs_run_id_get(run_id=run_id)
    assert run.termination_reason is not None and run.termination_reason.value == "ALL_ITEMS_PROCESSED"
    assert run.statistics.item_succeeded_count == 1
    assert run.custom_metadata == {"study": "contract", "sdk": {"origin": "contract-test"}}

    listed = api.list_runs_v1_runs_get(
        application_id="he-tissue",
        application_version="1.0.0",
        external_id="contract/slide small.tiff",
        custom_metadata='$.study ? (@ == "contract")',
        page=1,
        page_size=5,
        sort=["-submitted_at"],
    )
    assert [r.run_id for r in listed] == [run_id]

    [only] = items
    assert (only.state, only.output) == (ItemState.TERMINATED, ItemOutput.FULL)
    by_external_id = api.get_item_by_run_v1_runs_run_id_items_external_id_get(
        run_id=run_id, external_id="contract/slide small.tiff"
    )
    assert by_external_id.item_id == only.item_id
    # (The client sends item_id__in/external_id__in unencoded, so a filter value must not hold a space.)
    filtered = api.list_run_items_v1_runs_run_id_items_get(
        run_id=run_id, item_id__in=[only.item_id], state=ItemState.TERMINATED, page_size=5
    )
    assert [i.item_id for i in filtered] == [only.item_id]

    with pytest.raises(NotFoundException):
        api.get_item_by_run_v1_runs_run_id_items_external_id_get(run_id=run_id, external_id="contract/other.tiff")
    with pytest.raises(NotFoundException):
        api.get_run_v1_runs_run_id_get(run_id=UNKNOWN_ID)
    # Another organisation cannot see the run at all.
    with pytest.raises(NotFoundException):
        other_org_api.get_run_v1_runs_run_id_get(run_id=run_id)
    with pytest.raises(NotFoundException):
        other_org_api.list_run_items_v1_runs_run_id_items_get(run_id=run_id)
    assert run_id not in {r.run_id for r in other_org_api.list_runs_v1_runs_get(page_size=100)}
    with pytest.raises(ApiException) as bad_id:
        api.get_run_v1_runs_run_id_get(run_id="not-a-uuid")
    assert bad_id.value.status == 422


def test_custom_metadata_with_checksums(api: PublicApi, finished_run: tuple[str, list[ItemResultReadResponse]]) -> None:
    run_id, _ = finished_run
    checksum = api.get_run_v1_runs_run_id_get(run_id=run_id).custom_metadata_checksum
    updated = api.put_run_custom_metadata_v1_runs_run_id_custom_metadata_put(
        run_id=run_id,
        custom_metadata_update_request=CustomMetadataUpdateRequest(
            custom_metadata={"study": "contract", "reviewed": True}, custom_metadata_checksum=checksum
        ),
    )
    assert updated.custom_metadata_checksum == api.get_run_v1_runs_run_id_get(run_id=run_id).custom_metadata_checksum
    with pytest.raises(ApiException) as stale:
        api.put_run_custom_metadata_v1_runs_run_id_custom_metadata_put(
            run_id=run_id,
            custom_metadata_update_request=CustomMetadataUpdateRequest(
                custom_metadata={"overwritten": True}, custom_metadata_checksum=checksum
            ),
        )
    assert stale.value.status == 412
    assert api.get_run_v1_runs_run_id_get(run_id=run_id).custom_metadata == {"study": "contract", "reviewed": True}

    # The item, addressed by an external_id with a slash and a space (percent-encoded by the client).
    external_id = "contract/slide small.tiff"
    item_checksum = api.get_item_by_run_v1_runs_run_id_items_external_id_get(
        run_id=run_id, external_id=external_id
    ).custom_metadata_checksum
    assert item_checksum is not None
    done = api.put_item_custom_metadata_by_run_v1_runs_run_id_items_external_id_custom_metadata_put(
        run_id=run_id,
        external_id=external_id,
        custom_metadata_update_request=CustomMetadataUpdateRequest(
            custom_metadata={"score": 0.9}, custom_metadata_checksum=item_checksum
        ),
    )
    read_back = api.get_item_by_run_v1_runs_run_id_items_external_id_get(run_id=run_id, external_id=external_id)
    assert (read_back.custom_metadata, read_back.custom_metadata_checksum) == (
        {"score": 0.9},
        done.custom_metadata_checksum,
    )
    with pytest.raises(ApiException) as stale_item:
        api.put_item_custom_metadata_by_run_v1_runs_run_id_items_external_id_custom_metadata_put(
            run_id=run_id,
            external_id=external_id,
            custom_metadata_update_request=CustomMetadataUpdateRequest(
                custom_metadata={}, custom_metadata_checksum=item_checksum
            ),
        )
    assert stale_item.value.status == 412
    with pytest.raises(NotFoundException):
        api.put_item_custom_metadata_by_run_v1_runs_run_id_items_external_id_custom_metadata_put(
            run_id=run_id,
            external_id="contract/nope.tiff",
            custom_metadata_update_request=CustomMetadataUpdateRequest(custom_metadata={}),
        )


def test_artifact_file_307_download_then_delete_then_410(
    api: PublicApi,
    other_org_api: PublicApi,
    finished_run: tuple[str, list[ItemResultReadResponse]],
) -> None:
    run_id, items = finished_run
    artifacts = {a.name: a for a in items[0].output_artifacts}
    summary = artifacts["summary:json"]
    assert summary.output is ArtifactOutput.AVAILABLE and summary.metadata is not None

    location = location_of(api, run_id, summary.output_artifact_id)
    assert location.startswith("http://127.0.0.1:")  # absolute: the SDK requires it
    fetched = HTTP.get(location, timeout=60)  # presigned: no Authorization, as the SDK fetches it
    assert fetched.status_code == 200
    assert Crc32cHasher(fetched.content).b64 == summary.metadata["checksum_base64_crc32c"]
    assert json.loads(fetched.content)

    with pytest.raises(NotFoundException):
        api.get_artifact_url_v1_runs_run_id_artifacts_artifact_id_file_get(run_id=run_id, artifact_id=UNKNOWN_ID)
    with pytest.raises(NotFoundException):
        other_org_api.get_artifact_url_v1_runs_run_id_artifacts_artifact_id_file_get(
            run_id=run_id, artifact_id=summary.output_artifact_id
        )
    with pytest.raises(NotFoundException):
        other_org_api.delete_run_items_v1_runs_run_id_artifacts_delete(run_id=run_id)

    assert api.delete_run_items_v1_runs_run_id_artifacts_delete(run_id=run_id) is None
    [after] = api.list_run_items_v1_runs_run_id_items_get(run_id=run_id)
    assert {a.output for a in after.output_artifacts} == {ArtifactOutput.DELETED_BY_USER}
    assert all(a.metadata is None for a in after.output_artifacts)
    with pytest.raises(ApiException) as gone:
        api.get_artifact_url_v1_runs_run_id_artifacts_artifact_id_file_get(
            run_id=run_id, artifact_id=summary.output_artifact_id
        )
    assert gone.value.status == 410
    # The old presigned URL no longer yields the file either.
    assert HTTP.get(location, timeout=60).status_code == 404


def test_cancel_202_then_409_and_delete_before_the_end_is_409(
    api: PublicApi, other_org_api: PublicApi, slide_small: SlideFile, stalled_url: str
) -> None:
    run_id = submit(api, [item("stalled.tiff", stalled_url, slide_small)])
    with pytest.raises(ApiException) as too_early:
        api.delete_run_items_v1_runs_run_id_artifacts_delete(run_id=run_id)
    assert too_early.value.status == 409
    with pytest.raises(NotFoundException):
        other_org_api.cancel_run_v1_runs_run_id_cancel_post(run_id=run_id)

    assert api.cancel_run_v1_runs_run_id_cancel_post(run_id=run_id) is None  # 202, body null
    run = api.get_run_v1_runs_run_id_get(run_id=run_id)
    assert run.state is RunState.TERMINATED
    assert run.termination_reason is not None and run.termination_reason.value == "CANCELED_BY_USER"
    [skipped] = api.list_run_items_v1_runs_run_id_items_get(run_id=run_id)
    assert skipped.termination_reason is not None and skipped.termination_reason.value == "SKIPPED"

    with pytest.raises(ApiException) as again:
        api.cancel_run_v1_runs_run_id_cancel_post(run_id=run_id)
    assert again.value.status == 409
    with pytest.raises(NotFoundException):
        api.cancel_run_v1_runs_run_id_cancel_post(run_id=UNKNOWN_ID)


def test_a_run_past_its_deadline_is_cancelled_by_the_system(
    api: PublicApi, slide_small: SlideFile, stalled_url: str
) -> None:
    due = datetime.now(UTC) + timedelta(seconds=2)
    deadline = datetime.now(UTC) + timedelta(seconds=4)
    run_id = submit(
        api,
        [item("late.tiff", stalled_url, slide_small)],
        scheduling=SchedulingRequest(due_date=due, deadline=deadline),
    )
    run = api.get_run_v1_runs_run_id_get(run_id=run_id)
    assert run.scheduling is not None
    assert run.scheduling.deadline is not None
    assert abs((run.scheduling.deadline - deadline).total_seconds()) < 0.001

    # The local stack's sweep runs every few seconds (SLIDEBRIDGE_DEADLINE_SWEEP_INTERVAL_S, default 5).
    ended = wait_terminated(api, run_id, timeout_s=60)
    assert ended.termination_reason is not None and ended.termination_reason.value == "CANCELED_BY_SYSTEM"
    assert ended.error_code == "SCHEDULER.DEADLINE_EXCEEDED"
    assert ended.terminated_at is not None and ended.terminated_at >= deadline
    [skipped] = api.list_run_items_v1_runs_run_id_items_get(run_id=run_id)
    assert skipped.termination_reason is not None and skipped.termination_reason.value == "SKIPPED"


# --- the high-level SDK's protocol ---------------------------------------------------------------


def sdk_submit(api: PublicApi, application_id: str, items: list[ItemCreationRequest]) -> str:
    """``Runs.submit(application_id, items)`` without a version, as aignostics 1.6.0 does it."""
    application = api.read_application_by_id_v1_applications_application_id_get(application_id=application_id)
    latest = max((v.number for v in application.versions), key=semver_key)
    version = api.application_version_details_v1_applications_application_id_versions_version_get(
        application_id=application_id, version=latest
    )
    definitions = {a.name: a for a in version.input_artifacts}
    assert len({i.external_id for i in items}) == len(items)
    for entry in items:
        assert {a.name for a in entry.input_artifacts} == set(definitions)
        for artifact in entry.input_artifacts:
            jsonschema.validate(artifact.metadata, definitions[artifact.name].metadata_schema)
    request = RunCreationRequest(
        application_id=application_id,
        version_number=None,  # the SDK sends explicit nulls
        custom_metadata={"sdk": {"schema_version": "0.0.4"}},
        items=items,
        scheduling=None,
        callback_context=None,
    )
    created = api.create_run_v1_runs_post(run_creation_request=request)
    assert created is not None
    return str(created.run_id)


def sdk_results(api: PublicApi, run_id: str) -> Iterator[ItemResultReadResponse]:
    """``paginate``: page size 20, stops on an empty or short page."""
    page = 1
    while True:
        batch = api.list_run_items_v1_runs_run_id_items_get(run_id=run_id, page=page, page_size=20)
        yield from batch
        if len(batch) < 20:
            return
        page += 1


def sdk_download_item(base_url: str, token: str, run_dir: Path, run_id: str, entry: ItemResultReadResponse) -> None:
    """``Run.ensure_artifacts_downloaded``: /file with requests (no redirects), the presigned URL without auth."""
    for artifact in entry.output_artifacts:
        if artifact.output is not ArtifactOutput.AVAILABLE or not artifact.metadata:
            continue
        media_type = artifact.metadata.get("media_type") or artifact.metadata.get("mime_type")
        path = run_dir / entry.external_id / f"{artifact.name}{SDK_EXTENSIONS[str(media_type)]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        response = HTTP.get(
            f"{base_url}/api/v1/runs/{run_id}/artifacts/{artifact.output_artifact_id}/file",
            headers={"Authorization": f"Bearer {token}"},
            allow_redirects=False,
            timeout=30,
        )
        assert response.status_code in {301, 302, 303, 307, 308}, response.text
        location = response.headers["Location"]
        assert location.startswith(("http://", "https://"))
        hasher = Crc32cHasher()
        with HTTP.get(location, stream=True, timeout=60) as stream, path.open("wb") as fh:
            stream.raise_for_status()
            for chunk in stream.iter_content(chunk_size=8 * 1024 * 1024):
                hasher.update(chunk)
                fh.write(chunk)
        assert hasher.b64 == artifact.metadata["checksum_base64_crc32c"], f"checksum mismatch for {artifact.name}"


def test_sdk_submission_and_download_protocol(
    api: PublicApi,
    local_stack: StackProcess,
    api_token: str,
    s3: Any,
    bucket: str,
    slide_small: SlideFile,
    tmp_path: Path,
) -> None:
    url = upload_slide(s3, bucket, slide_small.path, f"slides/contract-sdk/{uuid.uuid4()}/slide.tiff")
    run_id = sdk_submit(api, "he-tissue", [item("cases/sdk-slide.tiff", url, slide_small)])

    # Run.download_to_folder: poll while PENDING/PROCESSING, download TERMINATED+FULL items, final sweep.
    run_dir = tmp_path / run_id
    deadline = time.monotonic() + RUN_TIMEOUT_S
    state = api.get_run_v1_runs_run_id_get(run_id=run_id).state
    while state in {RunState.PENDING, RunState.PROCESSING}:
        assert time.monotonic() < deadline, f"run {run_id} still {state}"
        for entry in sdk_results(api, run_id):
            if entry.state is ItemState.TERMINATED and entry.output is ItemOutput.FULL:
                sdk_download_item(local_stack.url, api_token, run_dir, run_id, entry)
        time.sleep(1.0)
        state = api.get_run_v1_runs_run_id_get(run_id=run_id).state
    for entry in sdk_results(api, run_id):
        if entry.state is ItemState.TERMINATED and entry.output is ItemOutput.FULL:
            sdk_download_item(local_stack.url, api_token, run_dir, run_id, entry)

    files = sorted(p.relative_to(tmp_path).as_posix() for p in run_dir.rglob("*") if p.is_file())
    assert files == [
        f"{run_id}/cases/sdk-slide.tiff/heatmap:png.png",
        f"{run_id}/cases/sdk-slide.tiff/summary:json.json",
        f"{run_id}/cases/sdk-slide.tiff/tiles:csv.csv",
        f"{run_id}/cases/sdk-slide.tiff/tissue:geojson.json",
    ]
    run = api.get_run_v1_runs_run_id_get(run_id=run_id)
    assert run.version_number == "1.0.0"  # "latest" resolved as the SDK resolves it
