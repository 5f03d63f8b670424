"""The Platform API front door end to end: upload, submit, wait, download, verify (what the demo does)."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from PIL import Image

from local.demo import PlatformClient, SlideFile, platform_run_body, upload_slide
from slidebridge.checksums import crc32c_b64_of_file

pytestmark = pytest.mark.e2e

EXPECTED_ARTIFACTS = {
    "tissue:geojson": "application/geo+json",
    "tiles:csv": "text/csv",
    "heatmap:png": "image/png",
    "summary:json": "application/json",
}


def submit(
    platform: PlatformClient, s3: Any, bucket: str, slide: SlideFile, external_id: str
) -> tuple[str, dict[str, Any]]:
    url = upload_slide(s3, bucket, slide.path, f"slides/e2e/{uuid.uuid4()}/{slide.path.name}")
    body = platform_run_body(slide, url, external_id)
    return platform.submit_run(body), body


RunAndItems = tuple[dict[str, Any], list[dict[str, Any]]]
WaitForRun = Callable[[str], RunAndItems]


def test_run_succeeds_with_four_verified_artifacts(
    platform: PlatformClient,
    wait_for_run: WaitForRun,
    stack_log: Callable[[], str],
    s3: Any,
    bucket: str,
    slide_8k: SlideFile,
    tmp_path: Path,
) -> None:
    # A slash in the external id, as the SDK's CLI sends file paths (%2F on the wire).
    external_id = "e2e/slide-8k.tiff"
    run_id, _ = submit(platform, s3, bucket, slide_8k, external_id)

    run, items = wait_for_run(run_id)

    assert run["state"] == "TERMINATED"
    assert run["termination_reason"] == "ALL_ITEMS_PROCESSED"
    assert run["output"] == "FULL"
    assert run["statistics"]["item_count"] == 1
    assert run["statistics"]["item_succeeded_count"] == 1
    [item] = items
    assert (item["state"], item["termination_reason"], item["output"]) == ("TERMINATED", "SUCCEEDED", "FULL"), (
        item,
        stack_log(),
    )
    assert item["external_id"] == external_id

    artifacts = {a["name"]: a for a in item["output_artifacts"]}
    assert set(artifacts) == set(EXPECTED_ARTIFACTS)
    for name, media_type in EXPECTED_ARTIFACTS.items():
        artifact = artifacts[name]
        assert artifact["output"] == "AVAILABLE"
        assert artifact["state"] == "TERMINATED"
        assert artifact["metadata"]["media_type"] == media_type
        check = platform.download_artifact(run_id, artifact, tmp_path)
        assert check.checksum_ok, f"{name}: {check.actual_checksum} != {check.expected_checksum}"
        assert check.size_bytes > 0

    heatmap = tmp_path / "heatmap.png"
    with Image.open(heatmap) as image:
        assert image.format == "PNG"
        assert image.width > 0 and image.height > 0
    geojson = json.loads((tmp_path / "tissue.json").read_text())
    assert geojson["type"] == "FeatureCollection"
    assert geojson["features"], "the synthetic slide has tissue, so there must be class regions"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert isinstance(summary, dict) and summary
    rows = (tmp_path / "tiles.csv").read_text().splitlines()
    assert len(rows) > 1  # a header and at least one tile

    # The item is addressable by its external id with the slash percent-encoded exactly once.
    by_external_id = platform.http.get(f"/api/v1/runs/{run_id}/items/{quote(external_id, safe='')}")
    assert by_external_id.status_code == 200, by_external_id.text
    assert by_external_id.json()["item_id"] == item["item_id"]


def assert_user_error(
    wait_for_run: WaitForRun, stack_log: Callable[[], str], run_id: str, error_code: str
) -> dict[str, Any]:
    run, items = wait_for_run(run_id)
    assert run["state"] == "TERMINATED"
    assert run["termination_reason"] == "ALL_ITEMS_PROCESSED"
    assert run["output"] == "NONE"
    assert run["statistics"]["item_user_error_count"] == 1
    [item] = items
    assert item["state"] == "TERMINATED"
    assert item["termination_reason"] == "USER_ERROR", (item, stack_log())
    assert item["error_code"] == error_code
    assert item["error_message"]
    assert item["output"] == "NONE"
    return item


def test_wrong_checksum_ends_user_error(
    platform: PlatformClient,
    wait_for_run: WaitForRun,
    stack_log: Callable[[], str],
    s3: Any,
    bucket: str,
    slide_small: SlideFile,
) -> None:
    wrong = SlideFile(
        slide_small.path,
        slide_small.width_px,
        slide_small.height_px,
        slide_small.mpp,
        checksum_base64_crc32c="AAAAAA==",  # the CRC-32C of an empty file
    )
    run_id, _ = submit(platform, s3, bucket, wrong, "wrong-checksum.tiff")

    assert_user_error(wait_for_run, stack_log, run_id, "CHECKSUM_MISMATCH")


def test_png_ends_user_error_unsupported_format(
    platform: PlatformClient,
    wait_for_run: WaitForRun,
    stack_log: Callable[[], str],
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    png = tmp_path / "not-a-slide.png"
    buffer = io.BytesIO()
    Image.new("RGB", (512, 512), (230, 180, 200)).save(buffer, format="PNG")
    png.write_bytes(buffer.getvalue())
    # Declared as a TIFF with a correct checksum: only the content is wrong.
    disguised = SlideFile(png, 512, 512, 0.25, crc32c_b64_of_file(png), media_type="image/tiff")
    run_id, _ = submit(platform, s3, bucket, disguised, "not-a-slide.png")

    assert_user_error(wait_for_run, stack_log, run_id, "UNSUPPORTED_FORMAT")


def test_url_host_outside_the_allowlist_is_refused(
    platform: PlatformClient,
    wait_for_run: WaitForRun,
    stack_log: Callable[[], str],
    slide_small: SlideFile,
) -> None:
    # ".invalid" never resolves (RFC 6761), and the allowlist must refuse it before any lookup.
    body = platform_run_body(slide_small, "https://slides.example.invalid/slide.tiff", "outside.tiff")

    response = platform.http.post("/api/v1/runs", json=body)

    if response.status_code == 201:
        assert_user_error(wait_for_run, stack_log, response.json()["run_id"], "URL_NOT_ALLOWED")
    else:
        assert response.status_code == 400, response.text
        assert "detail" in response.json()
