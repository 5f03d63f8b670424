"""Techcyte tasks through the batch job, in process: what the lab sees in Techcyte's AI results panel.

moto stands in for DynamoDB/S3; the Techcyte peer is ``tests/fakes/techcyte.py`` on 127.0.0.1, which
enforces the fact sheet's server rules (all-or-nothing validation, one image region per scan,
appending evaluations) and serves the scans at presigned-style URLs without extensions.

GeoJSON is in level-0 pixels of each slide (TECHCYTE.md §9), not Sectra's width-normalised frame.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batch_job.__main__ import main
from lambdas.api import deps
from lambdas.job_events.handler import handler as job_events_handler
from slidebridge.errors import RetryableError
from slidebridge.jobs import cancel_run
from slidebridge.outbound import OutboundPolicy
from slidebridge.runs import ItemState, ItemTerminationReason, RunState
from slidebridge.settings import Settings, get_settings
from slidebridge.store import DeliveryState, RunStore
from slidebridge.vendors.techcyte import WebhookPayload
from slidebridge.vendors.techcyte_delivery import CHANNEL, TechcyteDelivery
from slidebridge.vendors.techcyte_service import TechcyteService
from tests.apigw import LambdaContext
from tests.fakes.techcyte import FakeTask, FakeTechcyte
from tests.integration.test_sectra_job import RecordingLauncher

JOB_FAILED_EVENT = Path(__file__).parent.parent / "fixtures" / "batch_job_state_change_failed.json"
TIFF_W, TIFF_H = 8192, 6144  # small_tiff_slide, level-0 px
DICOM_W, DICOM_H = 2048, 1536  # small_dicom_slide
GARBAGE = b"this is not a slide " * 200


@pytest.fixture
def fake() -> Iterator[FakeTechcyte]:
    with FakeTechcyte(client_id="lab-client", client_secret="lab-secret-5b1c") as server:
        yield server


@pytest.fixture
def settings(
    store: RunStore, fake: FakeTechcyte, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    monkeypatch.setenv("SLIDEBRIDGE_SCRATCH_DIR", str(tmp_path / "scratch"))
    monkeypatch.setenv("SLIDEBRIDGE_DOWNLOAD_HOSTS", "127.0.0.1")
    monkeypatch.setenv("SLIDEBRIDGE_TECHCYTE_API_URL", fake.base_url)
    monkeypatch.setenv("SLIDEBRIDGE_TECHCYTE_CLIENT_ID", "lab-client")
    monkeypatch.setenv("SLIDEBRIDGE_TECHCYTE_CLIENT_SECRET", "lab-secret-5b1c")
    monkeypatch.setenv("SLIDEBRIDGE_TILE_WORKERS", "1")
    monkeypatch.setenv("SLIDEBRIDGE_HTTP_TIMEOUT_S", "5")
    # The small DICOM slide is 1.0 × 0.8 mm: below the default 1 mm² QC floor for real biopsies.
    monkeypatch.setenv("SLIDEBRIDGE_TECHCYTE_MIN_TISSUE_MM2", "0.05")
    deps.reset()
    yield get_settings()
    deps.reset()


def _reload(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(f"SLIDEBRIDGE_{name.upper()}", value)
    get_settings.cache_clear()
    return get_settings()


def _accept(settings: Settings, store: RunStore, fake: FakeTechcyte, task: FakeTask, **payload_kw: bool) -> str:
    """What ``POST /hooks/techcyte/{key}`` does: the run, its items, the JWT apart; the job is ours to run."""
    launcher = RecordingLauncher()
    service = TechcyteService(settings, store, launcher, OutboundPolicy.from_settings(settings))
    answer = service.accept(WebhookPayload.model_validate(fake.webhook_payload(task, **payload_kw)))
    assert launcher.submitted == [(answer.run_id, len(task.scans))]
    return answer.run_id


def _features(scan: dict[str, Any]) -> list[dict[str, Any]]:
    features: list[dict[str, Any]] = scan["geojson"]["features"]
    return features


def _assert_level0(features: list[dict[str, Any]], width: int, height: int) -> None:
    assert features, "class outlines expected on a slide with tissue"
    xs, ys = [], []
    for feature in features:
        x0, y0, x1, y1 = feature["bbox"]
        assert all(isinstance(v, int) for v in feature["bbox"])
        for ring in feature["geometry"]["coordinates"]:
            assert ring[0] == ring[-1]
            for x, y in ring:
                assert x0 <= x <= x1 and y0 <= y <= y1, "every vertex inside the feature's bbox"
                xs.append(x)
                ys.append(y)
    assert min(xs) >= 0 and min(ys) >= 0
    assert max(xs) <= width and max(ys) <= height
    # Level-0 px, not a normalised frame: the outlines span a good part of the slide.
    assert max(xs) - min(xs) > width / 4 and max(ys) - min(ys) > height / 4


def _job_failed(run_id: str) -> dict[str, Any]:
    event: dict[str, Any] = copy.deepcopy(json.loads(JOB_FAILED_EVENT.read_text()))
    event["detail"]["parameters"]["run_id"] = run_id
    return event


# =================================================================================================
# The happy paths
# =================================================================================================


def test_one_scan_ends_with_one_evaluation_carrying_report_geojson_and_qc_pass(
    settings: Settings,
    store: RunStore,
    fake: FakeTechcyte,
    small_tiff_slide: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings = _reload(monkeypatch, techcyte_triage_class="cellular", techcyte_triage_threshold="0.0")
    task = fake.add_task({"5550001": [small_tiff_slide]}, stains={"5550001": {"value": "HE", "stain_code": "HE"}})
    run_id = _accept(settings, store, fake, task)

    assert main([run_id]) == 0

    assert len(fake.posts) == 1, fake.rejected
    (scan,) = fake.posts[0][1]["scanResults"]
    assert scan["scanId"] == "5550001"
    assert scan["qcFailReasons"] == []
    assert scan["results"]["summary"].startswith("Tissue ")
    assert scan["results"]["slidebridge_run"] == run_id
    workflow = scan["workflow"]
    assert (workflow["model_name"], workflow["provider"], workflow["ruo"]) == (
        settings.techcyte_model_name,
        "slidebridge",
        True,
    )
    assert workflow["key"] == "Cellular fraction" and workflow["value"].endswith("%")
    assert workflow["report"]["type"] == "Basic"
    assert {s["name"] for s in workflow["report"]["segments"]} == {"Tissue", "Cellular"}
    features = _features(scan)
    assert {f["properties"]["annotation_type"] for f in features} == {"tissue", "cellular"}
    _assert_level0(features, TIFF_W, TIFF_H)
    # Posting completed the scan; the lab sees exactly one evaluation, holding our summary.
    assert task.scans["5550001"].complete
    (evaluation,) = fake.evaluations_of(task)
    assert evaluation["details"]["report"]["summary"] == scan["results"]["summary"]
    # The task's own JWT was used: no client-credentials exchange was needed.
    assert fake.token_requests == []
    posts = [h for m, p, h in fake.requests if m == "POST" and "/external/results/" in p]
    assert posts[0]["authorization"] == f"Bearer {task.jwt}"
    # Triage: the case is ranked by its cellular share.
    triage = fake.triage[task.case_number]
    assert triage["triage_category"] == "priority"
    assert 0 < triage["triage_score"] <= 1
    run = store.get_run(run_id)
    assert run.state is RunState.TERMINATED
    delivery = store.get_delivery(run_id, CHANNEL)
    assert delivery is not None and delivery.state is DeliveryState.DELIVERED
    # Nothing secret in our logs: not the JWT, not the API secret, not a URL signature.
    assert task.jwt not in caplog.text
    assert "lab-secret-5b1c" not in caplog.text
    assert "X-Amz-Signature=" not in caplog.text


def test_three_scans_tiff_dicom_series_and_zipped_dicom_post_once_after_the_last(
    settings: Settings,
    store: RunStore,
    fake: FakeTechcyte,
    small_tiff_slide: Path,
    small_dicom_slide: list[Path],
    small_dicom_zip: Path,
) -> None:
    task = fake.add_task(
        {"7001": list(small_dicom_slide), "7002": [small_dicom_zip], "7003": [small_tiff_slide]},
    )
    run_id = _accept(settings, store, fake, task)
    assert len(store.list_items(run_id)[0].input_artifacts) == len(small_dicom_slide) > 1

    # The array children, one per scan: the first two end without a word to Techcyte.
    assert main([run_id, "--item", "0"]) == 0
    assert main([run_id, "--item", "1"]) == 0
    assert fake.posts == []
    assert main([run_id, "--item", "2"]) == 0

    assert len(fake.posts) == 1, fake.rejected
    scans = fake.posts[0][1]["scanResults"]
    assert [s["scanId"] for s in scans] == ["7001", "7002", "7003"]
    assert all(s["qcFailReasons"] == [] for s in scans)
    _assert_level0(_features(scans[0]), DICOM_W, DICOM_H)
    _assert_level0(_features(scans[1]), DICOM_W, DICOM_H)
    _assert_level0(_features(scans[2]), TIFF_W, TIFF_H)
    assert len(fake.evaluations_of(task)) == 3
    assert all(scan.complete for scan in task.scans.values())
    # A retried child finds the task delivered and posts nothing.
    assert main([run_id, "--item", "2", "--attempt", "2"]) == 0
    assert len(fake.posts) == 1


def test_unreadable_scan_gets_a_result_that_says_so_and_the_task_completes(
    settings: Settings, store: RunStore, fake: FakeTechcyte, small_dicom_slide: list[Path]
) -> None:
    task = fake.add_task({"8001": list(small_dicom_slide), "8002": [GARBAGE]})
    run_id = _accept(settings, store, fake, task)

    assert main([run_id]) == 0

    (post,) = fake.posts
    good, bad = post[1]["scanResults"]
    assert good["qcFailReasons"] == [] and _features(good)
    assert bad["scanId"] == "8002"
    assert bad["qcFailReasons"] == ["analysis_failed"]
    assert bad["results"]["summary"].startswith("Analysis failed: the scan could not be read")
    assert "geojson" not in bad
    assert all(scan.complete for scan in task.scans.values())
    assert store.get_item(run_id, 1).termination_reason is ItemTerminationReason.USER_ERROR


def test_too_little_tissue_fails_qc_and_a_debug_payload_uses_the_api_client(
    settings: Settings,
    store: RunStore,
    fake: FakeTechcyte,
    small_dicom_slide: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _reload(monkeypatch, techcyte_min_tissue_mm2="1000")
    task = fake.add_task({"9001": list(small_dicom_slide)})
    # A payload captured from the task notes carries no JWT (TECHCYTE.md §1).
    run_id = _accept(settings, store, fake, task, with_jwt=False)

    assert main([run_id]) == 0

    (scan,) = fake.posts[0][1]["scanResults"]
    assert scan["qcFailReasons"] == ["insufficient_tissue"]
    assert scan["results"]["summary"].startswith("QC failed: insufficient tissue")
    assert fake.token_requests == ["basic"]


# =================================================================================================
# Exactly once, whatever Techcyte does
# =================================================================================================


@pytest.mark.parametrize("fault", ["delay_after_store", "drop_after_store"])
def test_post_stored_but_unanswered_is_found_and_never_sent_twice(
    fault: str, settings: Settings, store: RunStore, fake: FakeTechcyte, small_dicom_slide: list[Path]
) -> None:
    task = fake.add_task({"6001": list(small_dicom_slide)})
    run_id = _accept(settings, store, fake, task)
    # The fake stores the results, then answers after the client's 5 s timeout (or never).
    fake.fail_next("results", fault, delay_s=8.0)

    assert main([run_id]) == 0

    assert len(fake.posts) == 1
    assert len(fake.evaluations_of(task)) == 1, "the lab must see one evaluation, not two"
    assert any(m == "GET" and "/case_evaluations/" in p for m, p, _ in fake.requests)
    delivery = store.get_delivery(run_id, CHANNEL)
    assert delivery is not None and delivery.state is DeliveryState.DELIVERED


def test_expired_token_is_fetched_again_once_and_the_post_goes_through(
    settings: Settings, store: RunStore, fake: FakeTechcyte, small_dicom_slide: list[Path]
) -> None:
    task = fake.add_task({"6101": list(small_dicom_slide)})
    run_id = _accept(settings, store, fake, task)
    fake.fail_next("results", 401)

    assert main([run_id]) == 0

    assert fake.token_requests == ["basic"]
    assert len(fake.posts) == 1
    assert len(fake.evaluations_of(task)) == 1


def test_techcyte_down_makes_the_job_retry_and_the_retry_posts_once(
    settings: Settings, store: RunStore, fake: FakeTechcyte, small_dicom_slide: list[Path]
) -> None:
    task = fake.add_task({"6201": list(small_dicom_slide)})
    run_id = _accept(settings, store, fake, task)
    fake.fail_next("results", 503, times=4)  # every attempt of the client's POST

    assert main([run_id, "--attempt", "1"]) == 75  # AWS Batch runs the job again

    delivery = store.get_delivery(run_id, CHANNEL)
    assert delivery is not None and delivery.state is DeliveryState.RELEASED
    assert fake.posts == []
    assert main([run_id, "--attempt", "2"]) == 0
    assert len(fake.posts) == 1
    assert len(fake.evaluations_of(task)) == 1


def test_refused_results_are_recorded_for_the_operator_and_never_retried(
    settings: Settings, store: RunStore, fake: FakeTechcyte, small_dicom_slide: list[Path]
) -> None:
    # A scan with two image regions: Techcyte rejects the whole POST (TECHCYTE.md §7).
    task = fake.add_task({"6301": list(small_dicom_slide)}, regions={"6301": 2})
    run_id = _accept(settings, store, fake, task)

    assert main([run_id]) == 3  # permanent: Batch gives up, the failed-job alarm fires

    assert len(fake.rejected) == 1 and "exactly one image region" in fake.rejected[0][1]
    delivery = store.get_delivery(run_id, CHANNEL)
    assert delivery is not None and delivery.state is DeliveryState.FAILED
    assert "400" in (store.get_run(run_id).vendor_context.get("delivery_error") or "")
    # The job's failure reaches job_events, which must not post again.
    job_events_handler(_job_failed(run_id), LambdaContext())  # type: ignore[arg-type]
    assert main([run_id, "--attempt", "2"]) == 0
    assert len(fake.rejected) == 1 and fake.posts == []


def test_job_that_died_has_its_scans_posted_by_job_events(
    settings: Settings, store: RunStore, fake: FakeTechcyte, small_dicom_slide: list[Path]
) -> None:
    task = fake.add_task({"6401": list(small_dicom_slide), "6402": list(small_dicom_slide)})
    run_id = _accept(settings, store, fake, task)
    assert main([run_id, "--item", "0"]) == 0
    # Child 1 was killed before it could start (e.g. its spot instance went away, retries spent).

    job_events_handler(_job_failed(run_id), LambdaContext())  # type: ignore[arg-type]

    (post,) = fake.posts
    analysed, died = post[1]["scanResults"]
    assert analysed["scanId"] == "6401" and analysed["qcFailReasons"] == [] and _features(analysed)
    assert died["scanId"] == "6402" and died["qcFailReasons"] == ["analysis_failed"]
    assert "processing job stopped" in died["results"]["summary"]
    assert all(scan.complete for scan in task.scans.values())
    # A second event (e.g. the parent after the child) changes nothing.
    job_events_handler(_job_failed(run_id), LambdaContext())  # type: ignore[arg-type]
    assert len(fake.posts) == 1


def test_concurrent_deliveries_post_once(settings: Settings, store: RunStore, fake: FakeTechcyte) -> None:
    task = fake.add_task({"6501": [GARBAGE], "6502": [GARBAGE]})
    run_id = _accept(settings, store, fake, task)
    for index in (0, 1):
        store.transition_item(run_id, index, ItemState.PROCESSING)
        store.transition_item(
            run_id,
            index,
            ItemState.TERMINATED,
            reason=ItemTerminationReason.USER_ERROR,
            error_code="UNREADABLE_SLIDE",
            error_message="not a slide",
        )
    # Slow answers keep the first holder busy while the second one arrives.
    fake.fail_next("results", "delay_after_store", delay_s=1.0)
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            policy = OutboundPolicy.from_settings(settings)
            TechcyteDelivery.from_settings(settings, RunStore(store.table_name), policy).deliver(run_id)
        except (RetryableError, AssertionError) as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert len(fake.posts) == 1
    assert len(fake.evaluations_of(task)) == 2  # one per scan, once


def test_cancelled_run_completes_the_task_with_cancelled_scans_and_keeps_finished_ones(
    settings: Settings, store: RunStore, fake: FakeTechcyte, small_dicom_slide: list[Path]
) -> None:
    task = fake.add_task({"6601": list(small_dicom_slide), "6602": list(small_dicom_slide)})
    run_id = _accept(settings, store, fake, task)
    assert main([run_id, "--item", "0"]) == 0
    launcher = RecordingLauncher()

    cancel_run(store, launcher, run_id, reason="cancelled by the lab's operator", settings=settings)

    assert launcher.cancelled == [("job-1", "cancelled by the lab's operator")]
    (post,) = fake.posts
    finished, cancelled = post[1]["scanResults"]
    assert finished["qcFailReasons"] == [] and _features(finished)
    assert cancelled["qcFailReasons"] == ["analysis_failed"]
    assert "cancelled (cancelled by the lab's operator)" in cancelled["results"]["summary"]
    # The stopped job's FAILED event changes nothing more.
    job_events_handler(_job_failed(run_id), LambdaContext())  # type: ignore[arg-type]
    assert len(fake.posts) == 1


class _RefusingLauncher(RecordingLauncher):
    """AWS Batch refusing the submission (quota, a deleted job definition)."""

    def submit(self, run_id: str, item_count: int) -> str:
        self.submitted.append((run_id, item_count))
        raise RuntimeError("SubmitJob: ClientException")


def test_job_that_cannot_be_submitted_completes_the_task_and_a_retried_webhook_starts_nothing(
    settings: Settings, store: RunStore, fake: FakeTechcyte
) -> None:
    task = fake.add_task({"6701": [GARBAGE], "6702": [GARBAGE]})
    launcher = _RefusingLauncher()
    service = TechcyteService(settings, store, launcher, OutboundPolicy.from_settings(settings))
    payload = WebhookPayload.model_validate(fake.webhook_payload(task))

    with pytest.raises(RuntimeError, match="SubmitJob"):
        service.accept(payload)

    # Techcyte keeps a task open until results arrive: each scan is told why, in one POST.
    (post,) = fake.posts
    scans = post[1]["scanResults"]
    assert len(scans) == 2
    assert all(scan["qcFailReasons"] == ["analysis_failed"] for scan in scans)
    assert all("could not be started" in scan["results"]["summary"] for scan in scans)
    # Techcyte delivering the webhook again finds the run: no second job, no second POST.
    service.accept(payload)
    assert len(launcher.submitted) == 1
    assert len(fake.posts) == 1
