"""Sectra runs through the batch job in process: what a pathologist sees in the Sectra viewer.

moto stands in for DynamoDB/S3. The Sectra peer is the real ``MockSectraServer`` (sectra_client)
on 127.0.0.1, behind a small recording reverse proxy (also on 127.0.0.1) whose URL is the
``callbackInfo.url`` the run stores, so every production call (webhook service, job, job_events)
goes through it. The proxy

- records every request that reaches "Sectra" and what it was answered;
- can answer 503 to chosen requests, either instead of forwarding them or after the mock acted
  (a lost answer: the write happened, the caller cannot know);
- refuses, like a real Sectra server and unlike the mock (SECTRA.md §15, deviation 2), a PUT whose
  ``versionId`` is not the result's current one, with 409.

Coordinates in results are Sectra's: level-0 px divided by the slide WIDTH, for x and y (§9).
"""

from __future__ import annotations

import copy
import http.client
import http.server
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sectra_client.mock_server import MockSectraServer
from sectra_client.schemas import ImageMetadata

from batch_job.__main__ import main
from batch_job.classifiers import get_classifier
from batch_job.destinations import SectraDestination
from lambdas.api import deps
from lambdas.job_events.handler import handler as job_events_handler
from slidebridge.errors import SectraUnavailableError
from slidebridge.outbound import OutboundPolicy
from slidebridge.runs import ItemState, ItemTerminationReason, Run, RunState, RunTerminationReason, utcnow
from slidebridge.scheduling import close_unlaunched_runs
from slidebridge.settings import Settings, get_settings
from slidebridge.store import TTL_ATTRIBUTE, RunStore
from slidebridge.vendors.sectra import (
    ImageNotification,
    Invocation,
    PrimitiveItem,
    PrimitiveResult,
    ResultData,
    ResultPayload,
    ResultPoint,
    ResultPolygon,
    StoredResult,
)
from slidebridge.vendors.sectra_service import SectraService
from slidebridge.vendors.sectra_writer import CALLBACK_TOKEN, SectraResultWriter
from tests.apigw import LambdaContext

APP = "he-tissue"
TOKEN = "sectra-callback-token-integration"
JOB_FAILED_EVENT = Path(__file__).parent.parent / "fixtures" / "batch_job_state_change_failed.json"
# small_tiff_slide (tests/conftest.py): 8192 × 6144 level-0 px at 0.5 µm/px.
SLIDE_W, SLIDE_H, SLIDE_MPP = 8192, 6144, 0.5
STATUS_TEXTS = ("Analysis queued", "Analysing")


# =================================================================================================
# The recording proxy in front of the mock
# =================================================================================================


@dataclass(frozen=True)
class Exchange:
    """One request that reached the proxy, and the status the caller got back."""

    method: str
    path: str
    status: int
    body: Any  # the request's JSON body; None when it had none

    @property
    def display(self) -> str:
        return str((self.body or {}).get("displayResult", ""))


@dataclass
class Fault:
    """Answer ``status`` to the next ``count`` requests of ``method`` for which ``when(body)`` holds."""

    method: str
    count: int
    when: Callable[[Any], bool] = lambda _body: True
    status: int = 503
    # False: refused before Sectra saw it. True: the mock acted and the answer was lost.
    after_forwarding: bool = False


_HOP_HEADERS = {"host", "connection", "content-length", "transfer-encoding", "keep-alive"}


@dataclass
class SectraProxy:
    """A recording reverse proxy on 127.0.0.1 in front of the mock (``upstream``).

    A proxy rather than an httpx hook or transport: production code builds its own clients (the
    outbound policy's transport, timeouts, retries), and only a real peer exercises all of that.
    """

    upstream: str
    exchanges: list[Exchange] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    # Called (on the proxy's thread) after a PUT/POST reached the mock, before the caller gets its answer.
    after_write: Callable[[Exchange], None] | None = None
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        target = httpx.URL(self.upstream)
        self._host, self._port = target.host, target.port or 80
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def writes(self) -> list[Exchange]:
        with self._lock:
            return [e for e in self.exchanges if e.method in ("PUT", "POST")]

    def record(self, exchange: Exchange) -> None:
        with self._lock:
            self.exchanges.append(exchange)

    def take_fault(self, method: str, body: Any) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.count > 0 and fault.method == method and fault.when(body):
                    fault.count -= 1
                    return fault
        return None

    def upstream_connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self._host, self._port, timeout=30)

    def stale_version(self, path: str, body: Any, authorization: str | None) -> bool:
        """Whether a result PUT carries a versionId other than the one the mock holds now."""
        connection = self.upstream_connection()
        try:
            connection.request("GET", path, headers={"Authorization": authorization or ""})
            response = connection.getresponse()
            current = json.loads(response.read()) if response.status == 200 else None
        finally:
            connection.close()
        if current is None:
            return False  # unknown result: the mock answers the PUT itself (404)
        return not isinstance(body, dict) or body.get("versionId") != current.get("versionId")


def _handler_for(proxy: SectraProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, and a streamed body may end with the connection.
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._proxy()

        def do_PUT(self) -> None:
            self._proxy()

        def do_POST(self) -> None:
            self._proxy()

        def _answer_json(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _proxy(self) -> None:
            try:
                self._forward()
            except (BrokenPipeError, ConnectionResetError):
                pass
            except BaseException as exc:
                proxy.errors.append(exc)
                raise

        def _forward(self) -> None:
            method = self.command
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw and "json" in (self.headers.get("Content-Type") or "") else None
            if (
                method == "PUT"
                and "/results/" in self.path
                and "/results/slide/" not in self.path
                and proxy.stale_version(self.path, body, self.headers.get("Authorization"))
            ):
                proxy.record(Exchange(method, self.path, 409, body))
                self._answer_json(409, {"error": "versionId is not the current version"})
                return
            fault = proxy.take_fault(method, body)
            if fault is not None and not fault.after_forwarding:
                proxy.record(Exchange(method, self.path, fault.status, body))
                self._answer_json(fault.status, {"error": "injected by the test proxy"})
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            connection = proxy.upstream_connection()
            try:
                connection.request(method, self.path, body=raw or None, headers=headers)
                response = connection.getresponse()
                if fault is not None:
                    response.read()
                    proxy.record(Exchange(method, self.path, fault.status, body))
                    self._answer_json(fault.status, {"error": "injected by the test proxy (after the write)"})
                    return
                exchange = Exchange(method, self.path, response.status, body)
                proxy.record(exchange)
                if method in ("PUT", "POST") and proxy.after_write is not None and response.status < 300:
                    proxy.after_write(exchange)
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP_HEADERS | {"date", "server"}:
                        self.send_header(name, value)
                self.end_headers()
                # Streamed in chunks (the slide files): never the whole body in memory.
                while chunk := response.read(1 << 20):
                    self.wfile.write(chunk)
            finally:
                connection.close()

    return Handler


# =================================================================================================
# Fixtures
# =================================================================================================


@dataclass
class RecordingLauncher:
    """Test double of the JobLauncher port: records, starts nothing (the test runs the job itself)."""

    submitted: list[tuple[str, int]] = field(default_factory=list)
    cancelled: list[tuple[str, str]] = field(default_factory=list)

    def submit(self, run_id: str, item_count: int) -> str:
        self.submitted.append((run_id, item_count))
        return f"job-{len(self.submitted)}"

    def cancel(self, job_id: str, reason: str) -> None:
        self.cancelled.append((job_id, reason))


@pytest.fixture(scope="module")
def mock() -> Iterator[MockSectraServer]:
    server = MockSectraServer(token=TOKEN)
    with server.run(port=0, host="127.0.0.1"):
        yield server


@pytest.fixture
def proxy(mock: MockSectraServer) -> Iterator[SectraProxy]:
    server = SectraProxy(mock.url)
    server.start()
    yield server
    server.stop()
    assert server.errors == [], f"the test proxy failed: {server.errors!r}"


@pytest.fixture
def settings(store: RunStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("SLIDEBRIDGE_SCRATCH_DIR", str(tmp_path / "scratch"))
    monkeypatch.setenv("SLIDEBRIDGE_SECTRA_CALLBACK_HOSTS", "127.0.0.1")
    monkeypatch.setenv("SLIDEBRIDGE_DOWNLOAD_HOSTS", "127.0.0.1")
    monkeypatch.setenv("SLIDEBRIDGE_TILE_WORKERS", "1")
    # Small batches: progress advances in steps of a few %, so every step (25, 50, 75) is passed on its own.
    monkeypatch.setenv("SLIDEBRIDGE_CLASSIFIER_BATCH_SIZE", "8")
    monkeypatch.setenv("SLIDEBRIDGE_SECTRA_PROGRESS_STEPS", "25,50,75")
    monkeypatch.setenv("SLIDEBRIDGE_HTTP_TIMEOUT_S", "20")
    deps.reset()
    yield get_settings()
    deps.reset()


@pytest.fixture
def launcher() -> RecordingLauncher:
    return RecordingLauncher()


@pytest.fixture
def service(settings: Settings, store: RunStore, launcher: RecordingLauncher) -> SectraService:
    return SectraService(
        settings,
        store,
        launcher,
        OutboundPolicy.from_settings(settings),
        feedback_writer=lambda owner, name, data: None,
    )


def _add_slide(mock: MockSectraServer, files: list[Path] | None) -> str:
    """A fresh slide id on the mock with small_tiff_slide's size; ``files`` None: the mock's fake TIFF."""
    slide_id = f"slide-{uuid.uuid4().hex[:8]}"
    mock.add_slide(
        ImageMetadata.model_validate(
            {
                "id": slide_id,
                "isStreamable": True,
                "imageSize": {"width": SLIDE_W, "height": SLIDE_H},
                "tileSize": {"width": 256, "height": 256},
                "micronsPerPixel": SLIDE_MPP,
                "focalPlanes": [{"id": "0", "offsetUm": 0.0}],
                "opticalPaths": [{"id": "0", "description": "Brightfield"}],
                "storedTileFormat": {"mimeType": "image/jpeg", "extension": "jpg"},
                "availableTileFormats": [{"mimeType": "image/jpeg", "extension": "jpg"}],
                "fileFormat": {"mimeType": "image/tiff"},
                "staining": {"displayName": "HE"},
                "block": {"displayName": "A1"},
            }
        )
    )
    if files is not None:
        mock.add_slide_files(slide_id, files)
    return slide_id


@dataclass
class Created:
    run_id: str
    slide_id: str
    answer: dict[str, Any]  # what the webhook answers Sectra: the stored placeholder
    callback: dict[str, str]


def _create(
    service: SectraService,
    launcher: RecordingLauncher,
    proxy: SectraProxy,
    slide_id: str,
    *,
    context: dict[str, Any] | None = None,
) -> Created:
    """What ``POST /hooks/sectra/{key}`` does for a ``create``: placeholder upsert, run, job submitted."""
    callback = {"url": proxy.url, "token": TOKEN}
    answer = service.create(
        Invocation.model_validate(
            {
                "action": "create",
                "applicationId": APP,
                "slideId": slide_id,
                "callbackInfo": callback,
                "context": context or {},
                "cancellationToken": uuid.uuid4().hex,
                "input": {"type": "wholeSlide"},
            }
        )
    )
    assert len(launcher.submitted) == 1, "one job per create"
    run_id, item_count = launcher.submitted[0]
    assert item_count == 1
    return Created(run_id=run_id, slide_id=slide_id, answer=answer, callback=callback)


def _stored(mock: MockSectraServer, slide_id: str) -> list[dict[str, Any]]:
    """The results Sectra holds for our application on the slide (what every viewer sees)."""
    return [r.model_dump(mode="json") for r in mock.get_results(APP, slide_id)]


def _result_path(result_id: object) -> str:
    return f"/applications/{APP}/results/{result_id}"


def _is_final(body: Any) -> bool:
    return isinstance(body, dict) and not str(body.get("displayResult", "")).startswith(STATUS_TEXTS)


def _polygon_points(content: list[dict[str, Any]]) -> list[tuple[float, float]]:
    return [(p["x"], p["y"]) for item in content for poly in item.get("polygons") or [] for p in poly["points"]]


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02X}{:02X}{:02X}".format(*color)


def _in_sectra_frame(points: list[tuple[float, float]]) -> bool:
    # x = px/W ∈ [0, 1], y = py/W ∈ [0, H/W] (both divided by the WIDTH, SECTRA.md §9).
    return all(0 <= x <= 1 and 0 <= y <= SLIDE_H / SLIDE_W + 1e-9 for x, y in points)


# =================================================================================================
# 1. placeholder → progress → final, in place
# =================================================================================================


def test_viewer_sees_placeholder_then_progress_then_class_polygons_in_one_result(
    service: SectraService,
    launcher: RecordingLauncher,
    proxy: SectraProxy,
    mock: MockSectraServer,
    store: RunStore,
    small_tiff_slide: Path,
) -> None:
    created = _create(service, launcher, proxy, _add_slide(mock, [small_tiff_slide]))
    result_id = created.answer["id"]
    assert created.answer["versionId"]
    assert created.answer["displayResult"] == "Analysis queued"

    assert main([created.run_id]) == 0

    writes = proxy.writes()
    assert all(w.status < 300 for w in writes), [(w.method, w.status, w.display) for w in writes]
    placeholder, *progress, final = writes
    assert (placeholder.method, placeholder.path) == ("POST", f"/applications/{APP}/results")
    assert placeholder.body["displayResult"] == "Analysis queued"
    assert placeholder.body["displayProperties"] == {"Progress": "0 %"}
    # Every later write updates the same result in place, carrying its id.
    assert all((w.method, w.path) == ("PUT", _result_path(result_id)) for w in [*progress, final])
    assert all(w.body["id"] == result_id for w in [*progress, final])
    percents = [int(w.body["displayProperties"]["Progress"].removesuffix(" %")) for w in progress]
    assert {25, 50, 75} <= set(percents), percents
    assert percents == sorted(percents), "progress never goes backwards"
    assert all(w.display == f"Analysing… {p} %" for w, p in zip(progress, percents, strict=True))

    # The final result: class-coloured outlines of tissue and cellular regions, and a headline.
    assert final.body["data"]["result"]["type"] == "primitive"
    content = final.body["data"]["result"]["content"]
    classifier = get_classifier("he-tissue", "1.0.0")
    colours = {
        name: _hex(colour)
        for name, colour in zip(classifier.class_names, classifier.class_colors, strict=True)
        if name != classifier.background_class
    }
    drawn = [item for item in content if item.get("polygons")]
    assert drawn, "class polygons expected on a slide with tissue"
    for item in drawn:
        labels = {label["label"] for label in item["labels"]}
        assert len(labels) == 1 and labels <= set(colours), labels
        assert item["style"]["strokeStyle"] == colours[labels.pop()]
        assert all(len(polygon["points"]) >= 3 for polygon in item["polygons"])
    points = _polygon_points(content)
    assert _in_sectra_frame(points)
    assert max(y for _, y in points) > 0.5, "y runs to H/W = 0.75 here"
    assert final.display.startswith("Tissue "), final.display
    assert "Tissue area" in final.body["displayProperties"]

    stored = _stored(mock, created.slide_id)
    assert len(stored) == 1, "one result on the slide, updated in place"
    assert stored[0]["id"] == result_id
    assert stored[0]["displayResult"] == final.display
    assert store.get_item(created.run_id, 0).termination_reason is ItemTerminationReason.SUCCEEDED
    run = store.get_run(created.run_id)
    assert run.state is RunState.TERMINATED
    # The run remembers the latest version: a later write (a cancel message) would not be stale.
    assert run.vendor_context["version_id"] == stored[0]["versionId"]


# =================================================================================================
# 2. Sectra answering 503
# =================================================================================================


@pytest.mark.parametrize(
    ("after_forwarding", "post_statuses", "final_put_statuses"),
    [
        # Refused before Sectra saw them: the POST is sent again, the final PUT twice more.
        pytest.param(False, [503, 201], [503, 503, 200], id="refused-before-sectra-acted"),
        # The mock stored the POST, its answer was lost: the result it made is adopted, not duplicated.
        # The mock applied the PUT, its answer was lost: the retry is stale (409), re-read, PUT again.
        pytest.param(True, [503], [503, 409, 200], id="answer-lost-after-sectra-acted"),
    ],
)
def test_503s_on_result_writes_end_with_the_final_result_and_no_duplicate(
    after_forwarding: bool,
    post_statuses: list[int],
    final_put_statuses: list[int],
    service: SectraService,
    launcher: RecordingLauncher,
    proxy: SectraProxy,
    mock: MockSectraServer,
    store: RunStore,
    small_tiff_slide: Path,
) -> None:
    # The webhook's client retries once (its answer must fit API Gateway's 29 s), the job's 3 times.
    # A lost answer to a PUT makes its retry stale (the mock already holds a new versionId); the
    # client's re-read after a 409 absorbs one such loss, so one is injected here.
    post_fault = Fault("POST", count=1, after_forwarding=after_forwarding)
    put_fault = Fault("PUT", count=1 if after_forwarding else 2, when=_is_final, after_forwarding=after_forwarding)
    proxy.faults += [post_fault, put_fault]
    created = _create(service, launcher, proxy, _add_slide(mock, [small_tiff_slide]))

    assert main([created.run_id]) == 0

    writes = proxy.writes()
    assert [w.status for w in writes if w.method == "POST"] == post_statuses
    assert [w.status for w in writes if _is_final(w.body)] == final_put_statuses
    stored = _stored(mock, created.slide_id)
    assert len(stored) == 1, f"retries must not create a second result: {[r['displayResult'] for r in stored]}"
    assert stored[0]["id"] == created.answer["id"]
    assert stored[0]["data"]["result"]["type"] == "primitive"
    assert stored[0]["displayResult"].startswith("Tissue ")
    assert store.get_item(created.run_id, 0).termination_reason is ItemTerminationReason.SUCCEEDED


def test_final_result_applied_twice_with_lost_answers_is_kept_not_overwritten_by_a_failure(
    service: SectraService,
    launcher: RecordingLauncher,
    proxy: SectraProxy,
    mock: MockSectraServer,
    store: RunStore,
    small_tiff_slide: Path,
) -> None:
    # Sectra applies the final PUT twice but both answers are lost: every retry is then stale.
    proxy.faults.append(Fault("PUT", count=2, when=_is_final, after_forwarding=True))
    created = _create(service, launcher, proxy, _add_slide(mock, [small_tiff_slide]))

    assert main([created.run_id]) == 0

    stored = _stored(mock, created.slide_id)
    assert len(stored) == 1
    assert stored[0]["displayResult"].startswith("Tissue "), "the delivered result stands"
    assert store.get_item(created.run_id, 0).termination_reason is ItemTerminationReason.SUCCEEDED
    run: Run = store.get_run(created.run_id)
    assert run.vendor_context["version_id"] == stored[0]["versionId"]


# =================================================================================================
# 3. Patch gallery
# =================================================================================================


def test_patches_context_gives_a_patch_gallery_of_the_classes(
    service: SectraService,
    launcher: RecordingLauncher,
    proxy: SectraProxy,
    mock: MockSectraServer,
    store: RunStore,
    small_tiff_slide: Path,
) -> None:
    created = _create(service, launcher, proxy, _add_slide(mock, [small_tiff_slide]), context={"output": "patches"})

    assert main([created.run_id]) == 0

    final = proxy.writes()[-1]
    assert final.status == 200 and _is_final(final.body)
    assert final.body["data"]["context"] == {"output": "patches"}, "the registration context is echoed"
    result = final.body["data"]["result"]
    assert result["type"] == "patchCollection"
    content = result["content"]
    classifier = get_classifier("he-tissue", "1.0.0")
    assert content["tags"] == [n for n in classifier.class_names if n != classifier.background_class]
    assert content["patches"], "a gallery of the most confident tiles"
    assert {p["tag"] for p in content["patches"]} <= set(range(len(content["tags"])))
    assert _in_sectra_frame([(p["position"]["x"], p["position"]["y"]) for p in content["patches"]])
    assert all(0 <= p["sortKeyValue"] <= 1 for p in content["patches"])
    assert content["patchSize"] == classifier.tile_px
    # Objective power: 10 / (µm per px) — 40× ≙ 0.25 µm/px.
    assert content["magnification"] == pytest.approx(10 / classifier.mpp)
    assert content["polygons"]
    stored = _stored(mock, created.slide_id)
    assert len(stored) == 1
    assert stored[0]["data"]["result"]["type"] == "patchCollection", "the mock (amspath's models) accepted it"
    assert store.get_item(created.run_id, 0).termination_reason is ItemTerminationReason.SUCCEEDED


# =================================================================================================
# 4. An unreadable slide
# =================================================================================================


@pytest.mark.parametrize(
    ("served", "code", "why"),
    [
        pytest.param(None, "UNREADABLE_SLIDE", "OpenSlide", id="mock-fake-8-byte-tiff"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "UNSUPPORTED_FORMAT", "PNG", id="png"),
    ],
)
def test_unreadable_slide_is_a_user_error_shown_in_the_viewer(
    served: bytes | None,
    code: str,
    why: str,
    service: SectraService,
    launcher: RecordingLauncher,
    proxy: SectraProxy,
    mock: MockSectraServer,
    store: RunStore,
    tmp_path: Path,
) -> None:
    files = None
    if served is not None:
        (tmp_path / "image.png").write_bytes(served)
        files = [tmp_path / "image.png"]
    created = _create(service, launcher, proxy, _add_slide(mock, files))

    assert main([created.run_id]) == 0  # a user error is not a job failure: no Batch retry

    item = store.get_item(created.run_id, 0)
    assert item.termination_reason is ItemTerminationReason.USER_ERROR
    assert item.error_code == code, item.error_message
    stored = _stored(mock, created.slide_id)
    assert len(stored) == 1 and stored[0]["id"] == created.answer["id"]
    display = stored[0]["displayResult"]
    assert display.startswith("Analysis failed:"), display
    assert why in display, f"the viewer should say why: {display!r}"
    assert (item.error_message or "")[:40] in display
    assert stored[0]["displayProperties"]["Status"] == display


# =================================================================================================
# 5. A job that dies
# =================================================================================================


def test_job_that_dies_ends_system_error_and_the_viewer_says_so(
    service: SectraService,
    launcher: RecordingLauncher,
    proxy: SectraProxy,
    mock: MockSectraServer,
    store: RunStore,
) -> None:
    created = _create(service, launcher, proxy, _add_slide(mock, None))
    store.transition_item(created.run_id, 0, ItemState.PROCESSING)  # the job had started, then died
    event = copy.deepcopy(json.loads(JOB_FAILED_EVENT.read_text()))
    event["detail"]["parameters"]["run_id"] = created.run_id

    answer = job_events_handler(event, LambdaContext())  # type: ignore[arg-type]

    assert answer == {"ended_items": 1}
    item = store.get_item(created.run_id, 0)
    assert item.termination_reason is ItemTerminationReason.SYSTEM_ERROR
    assert item.error_code == "JOB_FAILED"
    assert store.get_run(created.run_id).state is RunState.TERMINATED
    stored = _stored(mock, created.slide_id)
    assert len(stored) == 1 and stored[0]["id"] == created.answer["id"]
    assert stored[0]["displayResult"].startswith("Analysis failed: system error"), stored[0]["displayResult"]
    assert proxy.writes()[-1].method == "PUT", "the placeholder is updated, not a second result created"


# =================================================================================================
# 6. The pathologist deletes our result while the job runs
# =================================================================================================


def test_delete_while_the_job_runs_stops_every_further_write(
    service: SectraService,
    launcher: RecordingLauncher,
    proxy: SectraProxy,
    mock: MockSectraServer,
    store: RunStore,
    small_tiff_slide: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    created = _create(service, launcher, proxy, _add_slide(mock, [small_tiff_slide]))
    deleted_at: list[int] = []

    def delete_on_first_progress(exchange: Exchange) -> None:
        # Sectra sends the stored result as it holds it; the job waits for this PUT's answer meanwhile.
        if exchange.display.startswith("Analysing") and not deleted_at:
            deleted_at.append(len(proxy.writes()))
            stored = mock.get_results(APP, created.slide_id)[-1].model_dump(mode="json")
            invocation = {
                "action": "delete",
                "applicationId": APP,
                "slideId": created.slide_id,
                "callbackInfo": created.callback,
                "context": {},
                "input": stored,
            }
            assert service.delete(Invocation.model_validate(invocation)) == {}

    proxy.after_write = delete_on_first_progress
    # A spy on the writer the job uses: every write it attempts, and what came of it.
    attempts: list[StoredResult | None] = []
    original_write = SectraResultWriter.write

    def spy(self: SectraResultWriter, build: Callable[..., Any]) -> StoredResult | None:
        outcome = original_write(self, build)
        attempts.append(outcome)
        return outcome

    monkeypatch.setattr(SectraResultWriter, "write", spy)

    assert main([created.run_id]) == 0

    assert deleted_at, "the delete happened during the job"
    assert len(proxy.writes()) == deleted_at[0], [(w.method, w.display) for w in proxy.writes()[deleted_at[0] :]]
    # After the delete the job still reached its later progress steps and its delivery, and wrote nothing.
    assert len(attempts) >= 3 and attempts[0] is not None
    assert attempts[1:] == [None] * (len(attempts) - 1)
    assert launcher.cancelled == [("job-1", "result deleted in Sectra")]
    run = store.get_run(created.run_id)
    assert run.termination_reason is RunTerminationReason.CANCELED_BY_USER
    assert store.get_item(created.run_id, 0).termination_reason is ItemTerminationReason.SKIPPED
    assert _stored(mock, created.slide_id)[0]["displayResult"].startswith("Analysing")


# =================================================================================================
# 7. A stale versionId
# =================================================================================================


def test_stale_version_is_reread_and_the_write_succeeds(
    service: SectraService,
    launcher: RecordingLauncher,
    proxy: SectraProxy,
    mock: MockSectraServer,
    store: RunStore,
    settings: Settings,
) -> None:
    created = _create(service, launcher, proxy, _add_slide(mock, None))
    result_id = created.answer["id"]
    # Someone else updates the result in Sectra (straight at the mock, not through our proxy):
    # the versionId the run stored is no longer the current one.
    other = mock.get_results(APP, created.slide_id)[0].model_dump(mode="json")
    other["displayResult"] = "Analysis queued (edited elsewhere)"
    edited = httpx.put(f"{mock.url}{_result_path(result_id)}", json=other, headers={"Authorization": f"Bearer {TOKEN}"})
    assert edited.status_code == 200
    current_version = edited.json()["versionId"]
    assert current_version != created.answer["versionId"]

    destination = SectraDestination(
        store.get_run(created.run_id), store, settings, OutboundPolicy.from_settings(settings)
    )
    destination.on_progress(1, 4)  # 25 %: exactly one progress step

    puts = [w for w in proxy.writes() if w.method == "PUT"]
    assert [w.status for w in puts] == [409, 200], [(w.status, w.body.get("versionId")) for w in puts]
    assert puts[0].body["versionId"] == created.answer["versionId"]
    assert puts[1].body["versionId"] == current_version, "the retry carries the re-read versionId"
    stored = _stored(mock, created.slide_id)
    assert len(stored) == 1 and stored[0]["id"] == result_id
    assert stored[0]["displayResult"] == "Analysing… 25 %"
    run: Run = store.get_run(created.run_id)
    assert run.vendor_context["version_id"] == stored[0]["versionId"]


# =================================================================================================
# 8. The run or its job cannot be started
# =================================================================================================


class _RefusingLauncher(RecordingLauncher):
    """AWS Batch refusing the submission (quota, a deleted job definition)."""

    def submit(self, run_id: str, item_count: int) -> str:
        self.submitted.append((run_id, item_count))
        raise RuntimeError("SubmitJob: ClientException")


def _invocation(slide_id: str, proxy: SectraProxy, cancellation_token: str) -> Invocation:
    return Invocation.model_validate(
        {
            "action": "create",
            "applicationId": APP,
            "slideId": slide_id,
            "callbackInfo": {"url": proxy.url, "token": TOKEN},
            "cancellationToken": cancellation_token,
            "input": {"type": "wholeSlide"},
        }
    )


def test_job_that_cannot_be_submitted_says_so_in_the_viewer_and_a_retry_starts_nothing(
    settings: Settings, store: RunStore, proxy: SectraProxy, mock: MockSectraServer
) -> None:
    launcher = _RefusingLauncher()
    service = SectraService(
        settings, store, launcher, OutboundPolicy.from_settings(settings), feedback_writer=lambda o, n, d: None
    )
    slide_id = _add_slide(mock, None)
    invocation = _invocation(slide_id, proxy, uuid.uuid4().hex)

    with pytest.raises(RuntimeError, match="SubmitJob"):
        service.create(invocation)

    # The pathologist sees why, in the result that said "Analysis queued", not a second one.
    [shown] = _stored(mock, slide_id)
    assert shown["displayResult"] == "Analysis could not be started: run it again"
    [(run_id, _)] = launcher.submitted
    run = store.get_run(run_id)
    assert run.state is RunState.TERMINATED
    assert run.error_code == "JOB_SUBMISSION_FAILED"
    assert run.vendor_context["version_id"] == shown["versionId"]
    # Written with the run: a later delete or modify of that result finds the (ended) run.
    assert store.find_alias(f"sectra-slide:{APP}:{slide_id}") == run_id
    assert store.find_alias(f"sectra-result:{APP}:{shown['id']}") == run_id

    # Sectra retrying the same invocation gets that result back and starts nothing.
    assert service.create(invocation)["displayResult"] == "Analysis could not be started: run it again"
    assert len(launcher.submitted) == 1
    assert len(_stored(mock, slide_id)) == 1


def test_run_that_cannot_be_recorded_leaves_no_queued_placeholder_and_no_job(
    service: SectraService,
    launcher: RecordingLauncher,
    store: RunStore,
    proxy: SectraProxy,
    mock: MockSectraServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def table_unavailable(*args: object, **kwargs: object) -> Run:
        raise RuntimeError("DynamoDB: ServiceUnavailable")

    monkeypatch.setattr(store, "create_run", table_unavailable)
    slide_id = _add_slide(mock, None)
    token = uuid.uuid4().hex
    with pytest.raises(RuntimeError, match="ServiceUnavailable"):
        service.create(_invocation(slide_id, proxy, token))

    [shown] = _stored(mock, slide_id)
    assert shown["displayResult"] == "Analysis could not be started: run it again"
    assert launcher.submitted == []
    assert store.find_idempotent_run(SectraService.idempotency_key(APP, slide_id, token)) is None


# =================================================================================================
# 9. A final result larger than a DynamoDB item
# =================================================================================================


def _outlines_result(slide_id: str, points: int) -> ResultPayload:
    """A final result with one outline of ``points`` vertices (the builder allows up to 20 000)."""
    ring = [ResultPoint(x=0.1 + 0.3 * (i / points), y=0.1 + 0.0001 * (i % 7)) for i in range(points)]
    return ResultPayload(
        slideId=slide_id,
        displayResult="Tissue 71 % · cellular 29 %",
        displayProperties={"Tiles": "3173"},
        applicationVersion="1.0.0",
        data=ResultData(result=PrimitiveResult(content=[PrimitiveItem(polygons=[ResultPolygon(points=ring)])])),
    )


def test_final_result_larger_than_a_dynamodb_item_is_kept_and_a_repeated_create_gets_it_whole(
    service: SectraService,
    launcher: RecordingLauncher,
    settings: Settings,
    store: RunStore,
    proxy: SectraProxy,
    mock: MockSectraServer,
) -> None:
    slide_id = _add_slide(mock, None)
    invocation = _invocation(slide_id, proxy, uuid.uuid4().hex)
    service.create(invocation)
    [(run_id, _)] = launcher.submitted
    writer = SectraResultWriter(store, run_id, settings=settings, policy=OutboundPolicy.from_settings(settings))

    # The job's final write: 20 000 vertices, about 640 KB of JSON (a DynamoDB item holds 400 KB).
    final = writer.write(lambda context: _outlines_result(context.slide_id, 20_000))
    assert final is not None
    [shown] = _stored(mock, slide_id)
    assert len(shown["data"]["result"]["content"][0]["polygons"][0]["points"]) == 20_000
    run = store.get_run(run_id)
    assert run.vendor_context["version_id"] == shown["versionId"]
    assert run.vendor_context["stored_result_complete"] is False
    assert "data" not in run.vendor_context["stored_result"]

    # A later write (a failure note, a second final) still carries the current versionId.
    assert writer.write(lambda context: _outlines_result(context.slide_id, 19_000)) is not None
    assert [w.status for w in proxy.writes() if w.method == "PUT"][-1] == 200

    # Sectra repeating the create gets the result as stored now, outlines and all, and nothing starts.
    again = service.create(invocation)
    [shown] = _stored(mock, slide_id)
    assert again["versionId"] == shown["versionId"]
    assert len(again["data"]["result"]["content"][0]["polygons"][0]["points"]) == 19_000
    assert len(launcher.submitted) == 1


# =================================================================================================
# 10. Cancel
# =================================================================================================


def _cancel_invocation(slide_id: str, proxy: SectraProxy, cancellation_token: str, token: str = TOKEN) -> Invocation:
    return Invocation.model_validate(
        {
            "action": "cancel",
            "applicationId": APP,
            "slideId": slide_id,
            "callbackInfo": {"url": proxy.url, "token": token},
            "cancellationToken": cancellation_token,
        }
    )


def _started(
    service: SectraService, launcher: RecordingLauncher, proxy: SectraProxy, mock: MockSectraServer
) -> tuple[str, str, str]:
    """A create on a fresh slide: (slide id, cancellation token, run id)."""
    slide_id = _add_slide(mock, None)
    cancellation_token = uuid.uuid4().hex
    service.create(_invocation(slide_id, proxy, cancellation_token))
    [(run_id, _)] = launcher.submitted
    return slide_id, cancellation_token, run_id


def _token_expiry(store: RunStore, run_id: str) -> int | None:
    record = store.client.get_item(
        TableName=store.table_name, Key={"pk": {"S": f"RUN#{run_id}"}, "sk": {"S": f"CRED#{CALLBACK_TOKEN}"}}
    ).get("Item")
    assert record is not None
    expires = record.get(TTL_ATTRIBUTE)
    return int(expires["N"]) if expires else None


def test_a_job_still_running_after_a_cancel_does_not_write_over_analysis_cancelled(
    service: SectraService,
    launcher: RecordingLauncher,
    store: RunStore,
    settings: Settings,
    proxy: SectraProxy,
    mock: MockSectraServer,
) -> None:
    # Given a job that started before the pathologist cancelled (Batch stops it only seconds later)
    slide_id, cancellation_token, run_id = _started(service, launcher, proxy, mock)
    destination = SectraDestination(store.get_run(run_id), store, settings, OutboundPolicy.from_settings(settings))
    service.cancel(_cancel_invocation(slide_id, proxy, cancellation_token))
    assert [r["displayResult"] for r in _stored(mock, slide_id)] == ["Analysis cancelled"]
    writes = len(proxy.writes())

    # When the job reaches a progress step, or fails as it is killed
    destination.on_progress(1, 1)
    destination.on_failure("Analysis failed: system error (SIGTERM); please try again")

    # Then the viewer keeps saying what the pathologist did
    assert len(proxy.writes()) == writes
    assert [r["displayResult"] for r in _stored(mock, slide_id)] == ["Analysis cancelled"]


def test_a_cancel_whose_message_failed_writes_it_when_sectra_repeats_it_and_only_then(
    service: SectraService,
    launcher: RecordingLauncher,
    store: RunStore,
    settings: Settings,
    proxy: SectraProxy,
    mock: MockSectraServer,
) -> None:
    slide_id, cancellation_token, run_id = _started(service, launcher, proxy, mock)

    # Sectra is briefly unavailable: the run is cancelled, but the message cannot be written.
    proxy.faults.append(Fault("PUT", count=2))
    with pytest.raises(SectraUnavailableError):
        service.cancel(_cancel_invocation(slide_id, proxy, cancellation_token))
    assert store.get_run(run_id).termination_reason is RunTerminationReason.CANCELED_BY_USER
    assert [r["displayResult"] for r in _stored(mock, slide_id)] == ["Analysis queued"]

    # Sectra repeats the cancel (with a fresh token): the message is written now.
    assert service.cancel(_cancel_invocation(slide_id, proxy, cancellation_token, token=TOKEN)) == []
    assert [r["displayResult"] for r in _stored(mock, slide_id)] == ["Analysis cancelled"]
    # The fresh token expires like every credential of an ended run.
    expiry = _token_expiry(store, run_id)
    assert expiry is not None
    assert expiry <= int(utcnow().timestamp()) + settings.credential_ttl_after_run_s

    # A third repeat finds the message in place and writes nothing.
    writes = len(proxy.writes())
    assert service.cancel(_cancel_invocation(slide_id, proxy, cancellation_token)) == []
    assert len(proxy.writes()) == writes
    assert launcher.cancelled == [("job-1", "cancelled in Sectra")]


def test_cancelling_a_finished_run_changes_nothing_and_keeps_no_new_token(
    service: SectraService,
    launcher: RecordingLauncher,
    store: RunStore,
    proxy: SectraProxy,
    mock: MockSectraServer,
) -> None:
    slide_id, cancellation_token, run_id = _started(service, launcher, proxy, mock)
    store.transition_item(run_id, 0, ItemState.PROCESSING)
    store.transition_item(run_id, 0, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED)
    writes = len(proxy.writes())

    assert service.cancel(_cancel_invocation(slide_id, proxy, cancellation_token, token="a-newer-token")) == []

    assert len(proxy.writes()) == writes
    assert store.get_run(run_id).termination_reason is RunTerminationReason.ALL_ITEMS_PROCESSED
    assert store.get_credential(run_id, CALLBACK_TOKEN) == TOKEN  # the newer bearer token was not stored
    assert launcher.cancelled == []


def test_a_create_cut_short_before_its_job_is_closed_by_the_sweep_and_the_viewer_told(
    service: SectraService,
    launcher: RecordingLauncher,
    store: RunStore,
    settings: Settings,
    proxy: SectraProxy,
    mock: MockSectraServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a create whose Lambda is killed (its timeout) after the run was recorded, before its job
    class LambdaTimeout(BaseException):
        """What the runtime's kill looks like to our code: nothing of it can be caught."""

    def killed(*args: object, **kwargs: object) -> str:
        raise LambdaTimeout

    monkeypatch.setattr("slidebridge.vendors.sectra_service.submit_run_job", killed)
    slide_id = _add_slide(mock, None)
    token = uuid.uuid4().hex
    with pytest.raises(LambdaTimeout):
        service.create(_invocation(slide_id, proxy, token))
    run_id = store.find_idempotent_run(SectraService.idempotency_key(APP, slide_id, token))
    assert run_id is not None
    assert [r["displayResult"] for r in _stored(mock, slide_id)] == ["Analysis queued"]

    # When the scheduler's sweep runs after the grace period
    later = utcnow() + timedelta(seconds=settings.launch_grace_s + 60)
    assert close_unlaunched_runs(store, settings, now=later) == [run_id]

    # Then the run is closed and the pathologist no longer sees "queued" for ever
    assert store.get_run(run_id).state is RunState.TERMINATED
    assert store.get_item(run_id, 0).termination_reason is ItemTerminationReason.SYSTEM_ERROR
    [shown] = _stored(mock, slide_id)
    assert shown["displayResult"].startswith("Analysis failed")
    assert launcher.submitted == []


# =================================================================================================
# 11. Image notifications: auto-run only for the stains the classifier is for
# =================================================================================================


def _notification(mock: MockSectraServer, proxy: SectraProxy, slide_id: str, stain: str | None) -> ImageNotification:
    info = mock._get_or_create_slide(slide_id).model_dump(mode="json")
    info["staining"] = {"displayName": stain} if stain is not None else None
    return ImageNotification.model_validate(
        {
            "applicationId": APP,
            "slideId": slide_id,
            "callbackInfo": {"url": proxy.url, "token": TOKEN},
            "context": {"autoRun": True, "autoRunStains": ["H&E"]},
            "imageInfo": info,
        }
    )


@pytest.mark.parametrize(
    ("stain", "analysed"),
    [("H&E", True), ("h & e", True), ("HE", True), ("PAS", False), ("Ki-67", False), (None, False)],
)
def test_auto_run_analyses_only_the_listed_stains(
    service: SectraService,
    launcher: RecordingLauncher,
    proxy: SectraProxy,
    mock: MockSectraServer,
    stain: str | None,
    analysed: bool,
) -> None:
    slide_id = _add_slide(mock, None)
    assert service.image_notification(_notification(mock, proxy, slide_id, stain)) == {}
    assert len(launcher.submitted) == (1 if analysed else 0)
    # An IHC slide gets no GPU job and no result in the viewer.
    assert len(_stored(mock, slide_id)) == (1 if analysed else 0)
