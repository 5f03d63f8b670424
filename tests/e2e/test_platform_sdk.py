"""The real high-level SDK (``aignostics.platform`` 1.6.0) against the local stack: submit, watch, download.

The project installs aignostics with ``--no-deps`` (its full dependency set brings a GUI toolkit and
more) plus the packages ``aignostics.platform`` imports (requirements-dev.txt), which is enough for the
SDK's submit, poll and download. ``test_platform_contract.py`` covers every operation with the
generated client.
"""

from __future__ import annotations

import importlib
import uuid
from pathlib import Path
from typing import Any

import pytest

from local.demo import SlideFile, upload_slide
from local.stack import StackProcess

pytestmark = pytest.mark.e2e


def test_sdk_submits_watches_and_downloads_with_verified_checksums(
    local_stack: StackProcess,
    api_token: str,
    s3: Any,
    bucket: str,
    slide_small: SlideFile,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    origin = local_stack.url.rstrip("/")
    # A non-Aignostics API root needs every OAuth setting, although a token provider never uses them.
    monkeypatch.setenv("AIGNOSTICS_API_ROOT", origin)
    monkeypatch.setenv("AIGNOSTICS_AUDIENCE", "slidebridge-api")
    for name in ("AUTHORIZATION_BASE_URL", "TOKEN_URL", "REDIRECT_URI", "DEVICE_URL", "JWS_JSON_URL"):
        monkeypatch.setenv(f"AIGNOSTICS_{name}", f"{origin}/unused")
    monkeypatch.setenv("AIGNOSTICS_CLIENT_ID_INTERACTIVE", "unused")
    # Imported after the environment is set: the SDK reads its settings on import.
    platform = importlib.import_module("aignostics.platform")

    url = upload_slide(s3, bucket, slide_small.path, f"slides/sdk/{uuid.uuid4()}/slide.tiff")
    client = platform.Client(token_provider=lambda: api_token)
    assert client.me().organization.id
    run = client.runs.submit(
        application_id="he-tissue",  # no version: the SDK picks the highest SemVer
        items=[
            platform.InputItem(
                external_id="cases/sdk slide.tiff",
                input_artifacts=[
                    platform.InputArtifact(name="whole_slide_image", download_url=url, metadata=slide_small.metadata())
                ],
            )
        ],
    )
    run.download_to_folder(tmp_path, sleep_interval=1, print_status=False, timeout_seconds=480)

    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    item_dir = f"{run.run_id}/cases/sdk slide.tiff"
    assert files == [
        f"{item_dir}/heatmap:png.png",
        f"{item_dir}/summary:json.json",
        f"{item_dir}/tiles:csv.csv",
        f"{item_dir}/tissue:geojson.json",
    ]
    details = run.details(nocache=True)
    assert (details.state.value, details.output.value) == ("TERMINATED", "FULL")
    assert details.version_number == "1.0.0"

    run.update_custom_metadata({"reviewed": True}, custom_metadata_checksum=details.custom_metadata_checksum)
    with pytest.raises(platform.ApiException) as stale:
        run.update_custom_metadata({"again": True}, custom_metadata_checksum=details.custom_metadata_checksum)
    assert stale.value.status == 412
    with pytest.raises(platform.ApiException) as finished:
        run.cancel()
    assert finished.value.status == 409
