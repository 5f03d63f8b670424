"""Techcyte end to end: the fake Techcyte API drives the local stack over loopback HTTP.

The session's stack was started pointing at ``techcyte_fake`` (``SLIDEBRIDGE_TECHCYTE_API_URL`` and the
API client id/secret, see ``conftest.py``), so its jobs post results there, as they would to Techcyte.
The scans are small (a TIFF and a two-file DICOM series at 1 µm/px) so that a run takes seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from local.demo import PlatformClient, SlideFile, cached_synthetic_slide
from local.fake_techcyte import FakeTask, FakeTechcyte
from local.stack import DEFAULT_TABLE_NAME, StackProcess
from local.synthetic import write_synthetic_dicom
from tests.e2e.conftest import TECHCYTE_KEY, RunAndItems

pytestmark = pytest.mark.e2e

# Both above the default 1 mm² QC floor: about 30 % tissue of 16.8 mm² and of 6.3 mm².
TIFF_W, TIFF_H = 4096, 4096
DICOM_W, DICOM_H = 3072, 2048
# Once the run has ended, the last scan's job posts at once; this is how long we give it.
POST_AFTER_RUN_S = 60.0


@pytest.fixture(scope="session")
def techcyte_tiff(slide_cache: Path) -> SlideFile:
    return cached_synthetic_slide(slide_cache, TIFF_W, TIFF_H, seed=4, mpp=1.0)


@pytest.fixture(scope="session")
def techcyte_dicom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A DICOM WSI series of two files (3072 × 2048 and 768 × 512 px): one presigned URL per file."""
    return write_synthetic_dicom(tmp_path_factory.mktemp("techcyte-dicom"), DICOM_W, DICOM_H, seed=6, mpp=1.0)


@pytest.fixture(scope="session")
def hook(local_stack: StackProcess) -> str:
    return f"{local_stack.url}/hooks/techcyte/{TECHCYTE_KEY}"


@pytest.fixture(scope="session")
def run_count(local_stack: StackProcess) -> Callable[[], int]:
    dynamodb = local_stack.aws_client("dynamodb")
    table = local_stack.env.get("SLIDEBRIDGE_TABLE_NAME", DEFAULT_TABLE_NAME)

    def count() -> int:
        items: list[dict[str, Any]] = dynamodb.scan(TableName=table)["Items"]
        return sum(1 for i in items if i["sk"]["S"] == "RUN")

    return count


def _posts(fake: FakeTechcyte, task: FakeTask) -> list[dict[str, Any]]:
    return [body for number, body in list(fake.posts) if number == task.number]


def _wait_for_post(fake: FakeTechcyte, task: FakeTask, stack_log: Callable[[], str]) -> dict[str, Any]:
    deadline = time.monotonic() + POST_AFTER_RUN_S
    while time.monotonic() < deadline:
        posts = _posts(fake, task)
        if posts:
            return posts[0]
        time.sleep(0.5)
    refused = [reason for number, reason in fake.rejected if number == task.number]
    raise AssertionError(f"no results POST for task {task.number}; refused: {refused}\n{stack_log()}")


def _assert_level0(scan: dict[str, Any], width: int, height: int) -> None:
    features = scan["geojson"]["features"]
    assert features, f"class outlines expected on scan {scan['scanId']}"
    assert all(isinstance(f["properties"]["annotation_type"], str) for f in features)
    points = [(x, y) for f in features for ring in f["geometry"]["coordinates"] for x, y in ring]
    xs, ys = [x for x, _ in points], [y for _, y in points]
    assert all(isinstance(v, int) for v in xs + ys), "level-0 px are integers"
    assert min(xs) >= 0 and min(ys) >= 0 and max(xs) <= width and max(ys) <= height
    # Level-0 px of THIS scan, not a normalised frame: the outlines span a good part of it.
    assert max(xs) - min(xs) > width / 4 and max(ys) - min(ys) > height / 4


def test_webhook_runs_every_scan_and_posts_the_results_once(
    hook: str,
    techcyte_fake: FakeTechcyte,
    techcyte_tiff: SlideFile,
    techcyte_dicom: list[Path],
    platform: PlatformClient,
    wait_for_run: Callable[[str], RunAndItems],
    stack_log: Callable[[], str],
) -> None:
    files: dict[str, list[bytes | Path]] = {"7101": [techcyte_tiff.path], "7102": [*techcyte_dicom]}
    task = techcyte_fake.add_task(files, stains={"7101": {"value": "HE", "stain_code": "HE", "label": "H&E"}})
    payload = techcyte_fake.webhook_payload(task)

    answer = httpx.post(hook, json=payload, timeout=30)
    assert answer.status_code == 200, answer.text
    accepted = answer.json()
    assert accepted["message"] == "accepted"
    run_id = accepted["run_id"]
    # Techcyte may deliver the webhook again: the same run answers, nothing new starts.
    again = httpx.post(hook, json=payload, timeout=30)
    assert again.status_code == 200
    assert again.json()["run_id"] == run_id

    # The run is an ordinary run of the Platform API: one item per scan, in the webhook's order.
    assert platform.get_run(run_id)["run_id"] == run_id
    run, items = wait_for_run(run_id)
    assert run["termination_reason"] == "ALL_ITEMS_PROCESSED"
    assert [i["external_id"] for i in items] == ["7101", "7102"]
    assert all(i["termination_reason"] == "SUCCEEDED" for i in items), items

    body = _wait_for_post(techcyte_fake, task, stack_log)
    scans = body["scanResults"]
    assert [s["scanId"] for s in scans] == ["7101", "7102"]
    assert all(s["qcFailReasons"] == [] for s in scans), [s["results"]["summary"] for s in scans]
    assert all(s["results"]["summary"].startswith("Tissue ") for s in scans)
    assert all(s["results"]["slidebridge_run"] == run_id for s in scans)
    _assert_level0(scans[0], TIFF_W, TIFF_H)
    _assert_level0(scans[1], DICOM_W, DICOM_H)
    # The lab sees one evaluation per scan, and both scans are complete.
    assert sorted(e["sample_id"] for e in techcyte_fake.evaluations_of(task)) == [7101, 7102]
    assert all(scan.complete for scan in task.scans.values())
    # Posted with the task's own JWT from the webhook.
    headers = [
        h
        for method, path, h in list(techcyte_fake.requests)
        if method == "POST" and path.rsplit("/", 1)[-1] in (task.task_id, str(task.number))
    ]
    assert [h["authorization"] for h in headers] == [f"Bearer {task.jwt}"]
    # Exactly once: nothing else arrives later (the job has ended; give a stray POST a moment).
    time.sleep(2.0)
    assert len(_posts(techcyte_fake, task)) == 1
    assert len(techcyte_fake.evaluations_of(task)) == 2


def test_wrong_key_is_404_and_starts_nothing(
    local_stack: StackProcess,
    techcyte_fake: FakeTechcyte,
    techcyte_dicom: list[Path],
    run_count: Callable[[], int],
) -> None:
    task = techcyte_fake.add_task({"7201": [*techcyte_dicom]})
    before = run_count()

    response = httpx.post(
        f"{local_stack.url}/hooks/techcyte/not-the-key", json=techcyte_fake.webhook_payload(task), timeout=30
    )

    assert response.status_code == 404
    assert run_count() == before
    # Nothing was fetched either: no request for any of the task's presigned file URLs.
    keys = {url.split("?", 1)[0].split("/", 3)[-1] for scan in task.scans.values() for url in scan.urls}
    assert not [path for _, path, _ in list(techcyte_fake.requests) if path.lstrip("/") in keys]
