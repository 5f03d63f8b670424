"""Sectra end to end: the real MockSectraServer drives the local stack over loopback HTTP."""

from __future__ import annotations

import http.server
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sectra_client.mock_server import MockSectraServer
from sectra_client.schemas import (
    CallbackInfo,
    CancelInvocation,
    CreateInvocation,
    Size,
    WholeSlideInput,
)

from local.demo import SlideFile, cached_synthetic_slide
from local.stack import DEFAULT_BUCKET_NAME, DEFAULT_TABLE_NAME, StackProcess
from tests.e2e.conftest import SECTRA_KEY

pytestmark = pytest.mark.e2e

APP = "he-tissue"
TOKEN = "sectra-callback-token-e2e"
RESULT_TIMEOUT_S = 300.0


@pytest.fixture(scope="session")
def sectra_slide(slide_cache: Any) -> SlideFile:
    # Not square on purpose: Sectra divides y by the WIDTH, so y runs to H/W = 0.75.
    return cached_synthetic_slide(slide_cache, 4096, 3072, seed=2, mpp=0.25)


@pytest.fixture(scope="session")
def mock(sectra_slide: SlideFile) -> Iterator[MockSectraServer]:
    server = MockSectraServer(token=TOKEN)
    with server.run(port=0, host="127.0.0.1"):
        yield server


@pytest.fixture
def slide_id(mock: MockSectraServer, sectra_slide: SlideFile) -> str:
    """A fresh slide id on the mock, with real files and metadata that match them."""
    slide = f"slide-{uuid.uuid4().hex[:8]}"
    template = mock._get_or_create_slide("template")
    mock.add_slide(
        template.model_copy(
            update={
                "id": slide,
                "imageSize": Size(width=sectra_slide.width_px, height=sectra_slide.height_px),
                "micronsPerPixel": sectra_slide.mpp,
            }
        )
    )
    mock.add_slide_files(slide, sectra_slide.path)
    return slide


@pytest.fixture(scope="session")
def hook(local_stack: StackProcess) -> str:
    return f"{local_stack.url}/hooks/sectra/{SECTRA_KEY}"


@pytest.fixture(scope="session")
def runs_table(local_stack: StackProcess) -> Callable[[], list[dict[str, Any]]]:
    dynamodb = local_stack.aws_client("dynamodb")
    table = local_stack.env.get("SLIDEBRIDGE_TABLE_NAME", DEFAULT_TABLE_NAME)

    def scan() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = dynamodb.scan(TableName=table)["Items"]
        return [i for i in items if i["sk"]["S"] == "RUN"]

    return scan


def _create(mock: MockSectraServer, slide: str, input_: Any = None, token: str | None = None) -> CreateInvocation:
    return CreateInvocation(
        applicationId=APP,
        slideId=slide,
        cancellationToken=token or uuid.uuid4().hex,
        callbackInfo=CallbackInfo(url=mock.url, token=TOKEN),
        input=input_ or WholeSlideInput(),
    )


def _runs_for(scan: Callable[[], list[dict[str, Any]]], slide: str) -> list[dict[str, Any]]:
    return [r for r in scan() if f'"slide_id":"{slide}"' in r["doc"]["S"].replace(" ", "")]


def _wait_final(mock: MockSectraServer, slide: str, stack_log: Callable[[], str]) -> Any:
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while time.monotonic() < deadline:
        results = mock.get_results(APP, slide)
        if results and not results[-1].displayResult.startswith(("Analysis queued", "Analysing")):
            return results[-1]
        time.sleep(1.0)
    raise AssertionError(f"no final Sectra result for {slide}\n{stack_log()}")


def _points(result: Any) -> list[tuple[float, float]]:
    dumped = result.model_dump()
    content = dumped["data"]["result"]["content"]
    items = content if isinstance(content, list) else [content]
    return [(p["x"], p["y"]) for item in items for poly in item.get("polygons") or [] for p in poly["points"]]


# --- registration and keys ------------------------------------------------------------------------


def test_registration_fills_the_admin_form(hook: str) -> None:
    response = httpx.get(hook)
    assert response.status_code == 200
    body = response.json()
    assert body["applicationId"] == APP
    assert body["url"] == hook
    assert body["inputTemplate"]["type"] in {"wholeSlide", "taggedPolygon", "multiArea"}
    assert {"displayName", "manufacturer", "context"} <= set(body)
    assert response.headers["X-Sectra-ApiVersion"]
    assert response.headers["X-Sectra-SoftwareVersion"]
    info = httpx.get(f"{hook}/info")
    assert info.status_code == 200
    assert info.json()["apiVersion"] == response.headers["X-Sectra-ApiVersion"]


def test_wrong_key_is_404_and_touches_nothing(
    local_stack: StackProcess, mock: MockSectraServer, slide_id: str, runs_table: Callable[[], list[dict[str, Any]]]
) -> None:
    before = len(runs_table())
    wrong = f"{local_stack.url}/hooks/sectra/not-the-key"
    assert httpx.get(wrong).status_code == 404
    response = httpx.post(wrong, json=_create(mock, slide_id).model_dump())
    assert response.status_code == 404
    assert len(runs_table()) == before
    assert mock.get_results(APP, slide_id) == []


# --- create → progress → final ----------------------------------------------------------------------


def test_create_whole_slide_ends_with_class_polygons_on_the_slide(
    hook: str, mock: MockSectraServer, slide_id: str, sectra_slide: SlideFile, stack_log: Callable[[], str]
) -> None:
    answer = httpx.post(hook, json=_create(mock, slide_id).model_dump(), timeout=30)
    assert answer.status_code == 200, answer.text
    stored = answer.json()
    assert stored["id"] is not None
    assert stored["versionId"]
    assert answer.headers["X-Sectra-ApiVersion"]

    final = _wait_final(mock, slide_id, stack_log)
    assert final.id == stored["id"], "the placeholder is updated in place, not duplicated"
    assert len(mock.get_results(APP, slide_id)) == 1
    assert "%" in final.displayResult
    assert final.displayProperties
    points = _points(final)
    assert points, "class polygons expected"
    ratio = sectra_slide.height_px / sectra_slide.width_px
    assert all(0 <= x <= 1 and 0 <= y <= ratio + 1e-9 for x, y in points)
    assert max(y for _, y in points) > 0.5, "y is divided by the width, so it reaches past 0.5 here"


def test_duplicate_create_answers_the_same_result_and_starts_one_job(
    hook: str,
    mock: MockSectraServer,
    slide_id: str,
    runs_table: Callable[[], list[dict[str, Any]]],
    stack_log: Callable[[], str],
) -> None:
    invocation = _create(mock, slide_id, token="same-token").model_dump()
    first = httpx.post(hook, json=invocation, timeout=30)
    second = httpx.post(hook, json=invocation, timeout=30)
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert len(_runs_for(runs_table, slide_id)) == 1
    _wait_final(mock, slide_id, stack_log)
    assert len(mock.get_results(APP, slide_id)) == 1


def test_tagged_polygon_is_analysed_inside_the_polygon_only(
    hook: str, mock: MockSectraServer, slide_id: str, stack_log: Callable[[], str]
) -> None:
    # The left half of the slide, in Sectra coordinates (x/W, y/W).
    polygon = {"points": [{"x": 0.0, "y": 0.0}, {"x": 0.5, "y": 0.0}, {"x": 0.5, "y": 0.75}, {"x": 0.0, "y": 0.75}]}
    body = _create(mock, slide_id).model_dump()
    body["input"] = {"type": "taggedPolygon", "content": {"polygon": polygon, "tags": ["A", "B"], "tagIndex": 0}}
    assert httpx.post(hook, json=body, timeout=30).status_code == 200
    final = _wait_final(mock, slide_id, stack_log)
    points = _points(final)
    assert points
    # Tiles are kept when their centre is inside; their outlines reach at most one tile further.
    assert max(x for x, _ in points) <= 0.5 + 0.25


def test_multi_area_is_analysed_inside_the_areas_only(
    hook: str, mock: MockSectraServer, slide_id: str, stack_log: Callable[[], str]
) -> None:
    square = {"points": [{"x": 0.5, "y": 0.25}, {"x": 1.0, "y": 0.25}, {"x": 1.0, "y": 0.75}, {"x": 0.5, "y": 0.75}]}
    body = _create(mock, slide_id).model_dump()
    body["input"] = {"type": "multiArea", "content": {"polygons": [square]}}
    assert httpx.post(hook, json=body, timeout=30).status_code == 200
    final = _wait_final(mock, slide_id, stack_log)
    points = _points(final)
    if points:  # the area may hold little tissue; what is there must be inside (give or take a tile)
        assert min(x for x, _ in points) >= 0.5 - 0.25


# --- cancel, delete, modify -------------------------------------------------------------------------


def test_cancel_stops_the_run_and_says_so_in_the_viewer(
    hook: str, mock: MockSectraServer, slide_id: str, runs_table: Callable[[], list[dict[str, Any]]]
) -> None:
    create = _create(mock, slide_id, token="cancel-me")
    assert httpx.post(hook, json=create.model_dump(), timeout=30).status_code == 200
    cancel = CancelInvocation(
        applicationId=APP, slideId=slide_id, cancellationToken="cancel-me", callbackInfo=create.callbackInfo
    )
    answer = httpx.post(hook, json=cancel.model_dump(), timeout=30)
    assert answer.status_code == 200
    assert answer.json() == []
    results = mock.get_results(APP, slide_id)
    assert len(results) == 1
    assert results[0].displayResult == "Analysis cancelled"
    (run,) = _runs_for(runs_table, slide_id)
    assert run["state"]["S"] == "TERMINATED"
    assert '"termination_reason":"CANCELED_BY_USER"' in run["doc"]["S"].replace(" ", "")
    time.sleep(3)  # a job that was already running must not overwrite the cancellation
    assert mock.get_results(APP, slide_id)[0].displayResult == "Analysis cancelled"


def test_delete_stops_writing_to_the_result(
    hook: str, mock: MockSectraServer, slide_id: str, runs_table: Callable[[], list[dict[str, Any]]]
) -> None:
    create = _create(mock, slide_id)
    stored = httpx.post(hook, json=create.model_dump(), timeout=30).json()
    body = {
        "action": "delete",
        "applicationId": APP,
        "slideId": slide_id,
        "callbackInfo": {"url": mock.url, "token": TOKEN},
        "context": None,
        "input": stored,
    }
    answer = httpx.post(hook, json=body, timeout=30)
    assert answer.status_code == 200
    assert answer.json() == {}
    version_after_delete = mock.get_results(APP, slide_id)[0].versionId
    time.sleep(5)
    assert mock.get_results(APP, slide_id)[0].versionId == version_after_delete, "no write after delete"
    (run,) = _runs_for(runs_table, slide_id)
    assert run["state"]["S"] == "TERMINATED"


def test_modify_is_put_and_kept_as_feedback(
    hook: str,
    mock: MockSectraServer,
    slide_id: str,
    local_stack: StackProcess,
    stack_log: Callable[[], str],
) -> None:
    assert httpx.post(hook, json=_create(mock, slide_id).model_dump(), timeout=30).status_code == 200
    final = _wait_final(mock, slide_id, stack_log)
    changed = final.model_dump(mode="json")
    changed["displayResult"] = "Corrected by pathologist"
    body = {
        "action": "modify",
        "applicationId": APP,
        "slideId": slide_id,
        "callbackInfo": {"url": mock.url, "token": TOKEN},
        "context": {},
        "input": changed,
    }
    answer = httpx.post(hook, json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["displayResult"] == "Corrected by pathologist"
    assert mock.get_results(APP, slide_id)[-1].displayResult == "Corrected by pathologist"
    s3 = local_stack.aws_client("s3")
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(
            Bucket=local_stack.env.get("SLIDEBRIDGE_BUCKET_NAME", DEFAULT_BUCKET_NAME), Prefix="feedback/"
        ).get("Contents", [])
    ]
    assert any(k.endswith("-modify.json") for k in keys)


# --- image notifications ----------------------------------------------------------------------------


def test_notification_without_auto_run_starts_nothing(
    hook: str, mock: MockSectraServer, slide_id: str, runs_table: Callable[[], list[dict[str, Any]]]
) -> None:
    assert mock.notify(hook, slide_id, application_id=APP) == {}
    assert _runs_for(runs_table, slide_id) == []


def test_notification_with_auto_run_analyses_the_slide(
    hook: str, mock: MockSectraServer, slide_id: str, stack_log: Callable[[], str]
) -> None:
    body = {
        "applicationId": APP,
        "slideId": slide_id,
        "callbackInfo": {"url": mock.url, "token": TOKEN},
        "context": {"autoRun": True},
        "imageInfo": mock._get_or_create_slide(slide_id).model_dump(mode="json"),
    }
    answer = httpx.post(f"{hook}/imagenotification", json=body, timeout=30)
    assert answer.status_code == 200
    assert answer.json() == {}
    final = _wait_final(mock, slide_id, stack_log)
    assert _points(final)


# --- refusals -------------------------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(500)
        self.end_headers()

    do_POST = do_PUT = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def unlisted_sectra() -> Iterator[tuple[str, list[str]]]:
    """A server on 127.0.0.2: loopback, but not in the callback allowlist (127.0.0.1, localhost)."""
    _Recorder.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.2:{server.server_address[1]}", _Recorder.hits
    server.shutdown()


def test_callback_host_not_allowed_is_refused_before_any_call(
    hook: str,
    slide_id: str,
    unlisted_sectra: tuple[str, list[str]],
    runs_table: Callable[[], list[dict[str, Any]]],
) -> None:
    url, hits = unlisted_sectra
    body = {
        "action": "create",
        "applicationId": APP,
        "slideId": slide_id,
        "cancellationToken": "x",
        "callbackInfo": {"url": url, "token": TOKEN},
        "input": {"type": "wholeSlide"},
    }
    answer = httpx.post(hook, json=body, timeout=30)
    assert answer.status_code == 403
    assert "allow" in answer.json()["error"]
    assert hits == []
    assert _runs_for(runs_table, slide_id) == []


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        {},
        {"action": "create"},
        {"action": "explode", "applicationId": APP, "slideId": "s", "callbackInfo": {"url": "http://127.0.0.1:1"}},
        {"action": "create", "applicationId": APP, "slideId": "s", "input": {"type": "wholeSlide"}},
        {
            "action": "create",
            "applicationId": APP,
            "slideId": "s",
            "callbackInfo": {"url": "http://127.0.0.1:1", "token": "t"},
            "input": {"type": "taggedPolygon", "content": {"polygon": {"points": [{"x": 0, "y": 0}]}}},
        },
    ],
)
def test_malformed_invocations_get_a_clear_4xx_and_store_nothing(
    hook: str, body: Any, runs_table: Callable[[], list[dict[str, Any]]]
) -> None:
    before = len(runs_table())
    if isinstance(body, str):
        answer = httpx.post(hook, content=body, headers={"Content-Type": "application/json"})
    else:
        answer = httpx.post(hook, json=body)
    assert 400 <= answer.status_code < 500
    assert answer.json()["error"]
    assert answer.headers["X-Sectra-ApiVersion"]
    assert len(runs_table()) == before


# --- a flaky Sectra -------------------------------------------------------------------------------


class _FlakyFilesProxy(http.server.BaseHTTPRequestHandler):
    """Forwards to the mock, but answers 503 to the first two slide-file downloads."""

    upstream = ""
    failures_left = 0
    answered: list[tuple[str, int]] = []

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.path.endswith("/files") and type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.answered.append((self.path, 503))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "content-length", "connection"}}
        upstream = httpx.request(self.command, self.upstream + self.path, headers=headers, content=body, timeout=30)
        self.answered.append((self.path, upstream.status_code))
        self.send_response(upstream.status_code)
        for key, value in upstream.headers.items():
            if key.lower() not in {"content-length", "transfer-encoding", "connection", "content-encoding"}:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(upstream.content)))
        self.end_headers()
        self.wfile.write(upstream.content)

    do_GET = do_POST = do_PUT = _forward

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_sectra_answering_503_twice_then_200_still_delivers(
    hook: str, mock: MockSectraServer, slide_id: str, stack_log: Callable[[], str]
) -> None:
    _FlakyFilesProxy.upstream = mock.url
    _FlakyFilesProxy.failures_left = 2
    _FlakyFilesProxy.answered = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyFilesProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = _create(mock, slide_id).model_dump()
        body["callbackInfo"]["url"] = f"http://127.0.0.1:{server.server_address[1]}"
        assert httpx.post(hook, json=body, timeout=30).status_code == 200
        final = _wait_final(mock, slide_id, stack_log)
    finally:
        server.shutdown()
    files = [status for path, status in _FlakyFilesProxy.answered if path.endswith("/files")]
    assert files == [503, 503, 200]
    assert _points(final)
    assert len(mock.get_results(APP, slide_id)) == 1
