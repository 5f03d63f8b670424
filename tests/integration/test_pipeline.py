"""The batch job end to end in process: moto for DynamoDB/S3, a loopback server for the slide URL."""

from __future__ import annotations

import csv
import functools
import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from batch_job.__main__ import main
from slidebridge.artifacts import ArtifactStore
from slidebridge.checksums import crc32c_b64_of_bytes, crc32c_b64_of_file
from slidebridge.runs import (
    InputArtifact,
    Item,
    ItemState,
    ItemTerminationReason,
    Run,
    RunState,
    RunTerminationReason,
)
from slidebridge.settings import get_settings
from slidebridge.store import RunStore
from tests.integration.conftest import BUCKET


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def slide_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Serves files of a folder on 127.0.0.1 (no Range support: the fetcher must cope)."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


@pytest.fixture
def job_env(store: RunStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunStore:
    monkeypatch.setenv("SLIDEBRIDGE_SCRATCH_DIR", str(tmp_path / "scratch"))
    monkeypatch.setenv("SLIDEBRIDGE_DOWNLOAD_HOSTS", "127.0.0.1")
    monkeypatch.setenv("SLIDEBRIDGE_TILE_WORKERS", "1")
    get_settings.cache_clear()
    return store


def _submit(store: RunStore, urls_and_crcs: list[tuple[str, str]]) -> Run:
    run = Run(application_id="he-tissue", version_number="1.0.0", organization_id="o", submitted_by="u")
    items = [
        Item(
            run_id=run.run_id,
            index=i,
            external_id=f"slide-{i}",
            input_artifacts=[
                InputArtifact(name="whole_slide_image", download_url=url, metadata={"checksum_base64_crc32c": crc})
            ],
        )
        for i, (url, crc) in enumerate(urls_and_crcs)
    ]
    return store.create_run(run, items)


def _s3_bytes(key: str) -> bytes:
    body: bytes = boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return body


def test_job_analyses_a_slide_and_stores_four_verified_artifacts(
    job_env: RunStore, slide_server: tuple[str, Path], small_tiff_slide: Path
) -> None:
    base, root = slide_server
    # Presigned URLs carry no extension: the format must come from the bytes.
    (root / "blob").write_bytes(small_tiff_slide.read_bytes())
    run = _submit(job_env, [(f"{base}/blob", crc32c_b64_of_file(small_tiff_slide))])

    assert main([run.run_id]) == 0

    final = job_env.get_run(run.run_id)
    assert final.state is RunState.TERMINATED
    assert final.statistics.item_succeeded_count == 1
    item = job_env.get_item(run.run_id, 0)
    assert item.termination_reason is ItemTerminationReason.SUCCEEDED, item.error_message
    by_name = {a.name: a for a in item.output_artifacts}
    assert set(by_name) == {"tissue:geojson", "tiles:csv", "heatmap:png", "summary:json"}
    for artifact in item.output_artifacts:
        assert artifact.metadata is not None
        data = _s3_bytes(artifact.s3_key)
        assert crc32c_b64_of_bytes(data) == artifact.metadata.checksum_base64_crc32c
        assert len(data) == artifact.metadata.size_bytes
    assert by_name["heatmap:png"].metadata is not None
    assert by_name["heatmap:png"].metadata.media_type == "image/png"
    assert _s3_bytes(by_name["heatmap:png"].s3_key).startswith(b"\x89PNG")
    geojson = json.loads(_s3_bytes(by_name["tissue:geojson"].s3_key))
    assert geojson["type"] == "FeatureCollection"
    assert geojson["features"], "the synthetic slide has tissue: regions expected"
    rows = list(csv.DictReader(io.StringIO(_s3_bytes(by_name["tiles:csv"].s3_key).decode())))
    assert rows, "tiles expected over tissue"


def test_checksum_mismatch_is_a_user_error_naming_it(
    job_env: RunStore, slide_server: tuple[str, Path], small_tiff_slide: Path
) -> None:
    base, root = slide_server
    (root / "blob").write_bytes(small_tiff_slide.read_bytes())
    run = _submit(job_env, [(f"{base}/blob", "AAAAAA==")])

    assert main([run.run_id]) == 0

    item = job_env.get_item(run.run_id, 0)
    assert item.state is ItemState.TERMINATED
    assert item.termination_reason is ItemTerminationReason.USER_ERROR
    assert item.error_code == "CHECKSUM_MISMATCH"
    assert item.output_artifacts == []
    assert job_env.get_run(run.run_id).statistics.item_user_error_count == 1


def test_unsupported_file_is_a_user_error_naming_what_was_found(
    job_env: RunStore, slide_server: tuple[str, Path]
) -> None:
    base, root = slide_server
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    (root / "image").write_bytes(png)
    run = _submit(job_env, [(f"{base}/image", crc32c_b64_of_bytes(png))])

    assert main([run.run_id]) == 0

    item = job_env.get_item(run.run_id, 0)
    assert item.termination_reason is ItemTerminationReason.USER_ERROR
    assert item.error_code == "UNSUPPORTED_FORMAT"
    assert "PNG" in (item.error_message or "")


def test_url_not_allowed_is_a_user_error_and_nothing_is_fetched(job_env: RunStore) -> None:
    run = _submit(job_env, [("https://slides.elsewhere.example/blob", "AAAAAA==")])

    assert main([run.run_id]) == 0

    item = job_env.get_item(run.run_id, 0)
    assert item.termination_reason is ItemTerminationReason.USER_ERROR
    assert item.error_code == "URL_NOT_ALLOWED"


def test_missing_file_is_a_user_error(job_env: RunStore, slide_server: tuple[str, Path]) -> None:
    base, _ = slide_server
    run = _submit(job_env, [(f"{base}/gone", "AAAAAA==")])
    assert main([run.run_id]) == 0
    assert job_env.get_item(run.run_id, 0).error_code == "DOWNLOAD_FAILED"


def test_unknown_run_exits_permanent(job_env: RunStore) -> None:
    assert main(["00000000-0000-4000-8000-000000000000"]) == 3


def test_cancelled_run_is_left_alone(job_env: RunStore) -> None:
    run = _submit(job_env, [("http://127.0.0.1:9/never", "AAAAAA==")])
    job_env.terminate_run(run.run_id, RunTerminationReason.CANCELED_BY_USER)
    assert main([run.run_id]) == 0
    assert job_env.get_item(run.run_id, 0).termination_reason is ItemTerminationReason.SKIPPED


# --- AWS throttled or unavailable beyond botocore's own retries ------------------------------------


def _aws_error(code: str, status: int, operation: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation
    )


@pytest.fixture
def served_run(job_env: RunStore, slide_server: tuple[str, Path], small_tiff_slide: Path) -> Run:
    """A run of one item whose slide the loopback server serves."""
    base, root = slide_server
    (root / "blob").write_bytes(small_tiff_slide.read_bytes())
    return _submit(job_env, [(f"{base}/blob", crc32c_b64_of_file(small_tiff_slide))])


def _s3_answers(monkeypatch: pytest.MonkeyPatch, code: str, status: int) -> None:
    """Every artifact upload fails with this S3 error (botocore's own retries already spent)."""

    def failing(self: ArtifactStore, *args: object, **kwargs: object) -> object:
        raise _aws_error(code, status, "PutObject")

    monkeypatch.setattr(ArtifactStore, "upload", failing)


def test_s3_throttling_hands_the_item_back_and_the_next_attempt_succeeds(
    job_env: RunStore, served_run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, upload = served_run, ArtifactStore.upload
    # Attempt 1: S3 keeps answering SlowDown. The item is not failed: Batch tries again (exit 75).
    _s3_answers(monkeypatch, "SlowDown", 503)
    assert main([run.run_id, "--attempt", "1"]) == 75
    item = job_env.get_item(run.run_id, 0)
    assert item.state is ItemState.PENDING
    assert item.error_code is None

    # Attempt 2: S3 is back; the analysis runs again and succeeds.
    monkeypatch.setattr(ArtifactStore, "upload", upload)
    assert main([run.run_id, "--attempt", "2"]) == 0
    assert job_env.get_item(run.run_id, 0).termination_reason is ItemTerminationReason.SUCCEEDED


def test_s3_throttling_on_the_last_attempt_ends_the_item_system_error(
    job_env: RunStore, served_run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    _s3_answers(monkeypatch, "SlowDown", 503)
    assert main([served_run.run_id, "--attempt", "3"]) == 3
    item = job_env.get_item(served_run.run_id, 0)
    assert item.termination_reason is ItemTerminationReason.SYSTEM_ERROR
    assert item.error_code == "RETRIES_EXHAUSTED"
    assert item.error_message is not None and "SlowDown" in item.error_message


def test_dynamodb_throttled_when_the_finished_item_is_closed_is_retried_not_failed(
    job_env: RunStore, served_run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The result is out (artifacts stored, vendor told); only the item's closing write is throttled.
    # Exit 1 would make Batch give up and job_events write "Analysis failed" over the delivered result.
    run = served_run
    transition_item = RunStore.transition_item

    def throttled_close(self: RunStore, run_id: str, index: int, state: ItemState, **kwargs: object) -> object:
        if state is ItemState.TERMINATED:
            raise _aws_error("ProvisionedThroughputExceededException", 400, "UpdateItem")
        return transition_item(self, run_id, index, state, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RunStore, "transition_item", throttled_close)
    assert main([run.run_id, "--attempt", "1"]) == 75
    assert job_env.get_item(run.run_id, 0).state is ItemState.PROCESSING

    monkeypatch.setattr(RunStore, "transition_item", transition_item)
    assert main([run.run_id, "--attempt", "2"]) == 0
    assert job_env.get_item(run.run_id, 0).termination_reason is ItemTerminationReason.SUCCEEDED


def test_an_aws_error_that_is_not_transient_still_fails_the_item(
    job_env: RunStore, served_run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    _s3_answers(monkeypatch, "AccessDenied", 403)
    assert main([served_run.run_id, "--attempt", "1"]) == 3
    item = job_env.get_item(served_run.run_id, 0)
    assert item.termination_reason is ItemTerminationReason.SYSTEM_ERROR
    assert item.error_code == "INTERNAL_ERROR"
