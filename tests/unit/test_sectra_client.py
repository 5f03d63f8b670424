"""SectraClient against httpx.MockTransport (real Sectra behaviours) and the MockSectraServer (loopback)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest
from sectra_client.mock_server import MockSectraServer

from local.synthetic import write_synthetic_slide
from slidebridge import __version__
from slidebridge.errors import RetryableError, UrlNotAllowedError
from slidebridge.outbound import OutboundPolicy, Purpose
from slidebridge.vendors.sectra import (
    IA_API_VERSION,
    ResultPayload,
    SectraAuthError,
    SectraClient,
    SectraConflictError,
    SectraError,
    SectraNotFoundError,
    SectraRedirectError,
    SectraUnavailableError,
    StoredResult,
    message_result,
    placeholder_result,
    progress_result,
    safe_filename,
)

PREFIX = "/SectraPathologyServer/external/imageanalysis/v1"
CB = f"https://pacs.hospital.example{PREFIX}"
TOKEN = "tok-SECRET-4711"
APP = "he-tissue"
SLIDE = "1.2.752.24.7.1234567.890"
W, H = 100_000, 80_000

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def policy() -> OutboundPolicy:
    return OutboundPolicy({Purpose.SECTRA_CALLBACK: [f"pacs.hospital.example{PREFIX}"]})


class Recorder:
    """A MockTransport that records requests and answers from a handler."""

    def __init__(self, handler: Handler) -> None:
        self.requests: list[httpx.Request] = []
        self._handler = handler
        self.transport = httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._handler(request)

    def calls(self) -> list[str]:
        return [f"{r.method} {r.url.path.removeprefix(PREFIX)}" for r in self.requests]


def client_for(recorder: Recorder, policy: OutboundPolicy, url: str = CB, **kwargs: Any) -> SectraClient:
    kwargs.setdefault("backoff_s", 0.0)
    return SectraClient(url, TOKEN, policy=policy, transport=recorder.transport, **kwargs)


def stored(result_id: int, version: str, text: str = "Analysis queued", **extra: Any) -> dict[str, Any]:
    payload = placeholder_result(SLIDE, W, H, application_version="1.0.0", text=text).to_wire()
    return payload | {"id": result_id, "versionId": version} | extra


def body(request: httpx.Request) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(request.content)
    return data


# --- construction, headers, URL policy ----------------------------------------------------------


def test_headers_on_every_call_and_trailing_slash_stripped(policy: OutboundPolicy) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/info") and "/slides/" not in request.url.path:
            return httpx.Response(200, json={"apiVersion": "1.10", "softwareVersion": "4.2.0.22617"})
        return httpx.Response(200, json={"id": SLIDE, "imageSize": {"width": W, "height": H}, "micronsPerPixel": 0.25})

    recorder = Recorder(handler)
    with client_for(recorder, policy, url=CB + "/") as client:
        info = client.get_info()
        slide = client.get_slide_info(SLIDE)
    assert (info.apiVersion, info.softwareVersion) == ("1.10", "4.2.0.22617")
    assert slide.dimensions == (W, H)
    assert recorder.calls() == ["GET /info", f"GET /slides/{SLIDE}/info"]
    for request in recorder.requests:
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert request.headers["x-sectra-apiversion"] == IA_API_VERSION == "1.5"
        assert request.headers["x-sectra-softwareversion"] == __version__
        assert request.headers["accept"] == "application/json"
        assert "includePHI" not in str(request.url)


def test_slide_ids_are_url_encoded_in_paths(policy: OutboundPolicy) -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json=[]))
    with client_for(recorder, policy) as client:
        assert client.list_results("my app", "a/b?c") == []
    assert recorder.requests[0].url.raw_path.decode().endswith("/applications/my%20app/results/slide/a%2Fb%3Fc")


def test_callback_host_not_allowed_raises_before_any_request(policy: OutboundPolicy) -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json={}))
    for url in (
        f"https://attacker.example{PREFIX}",
        "https://pacs.hospital.example/other/path",
        f"http://pacs.hospital.example{PREFIX}",  # http not allowed for a bare entry
        f"https://169.254.169.254{PREFIX}",
    ):
        with pytest.raises(UrlNotAllowedError):
            client_for(recorder, policy, url=url)
    assert recorder.requests == []


def test_callback_url_with_query_string_is_refused(policy: OutboundPolicy) -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json={}))
    with pytest.raises(UrlNotAllowedError, match="query"):
        client_for(recorder, policy, url=CB + "?x=1")


def test_real_transport_with_a_ca_bundle_is_built_without_network(policy: OutboundPolicy) -> None:
    with SectraClient(CB, TOKEN, policy=policy, ca_bundle=Path(certifi.where())) as client:
        assert client.base_url == CB
    with pytest.raises(FileNotFoundError):
        SectraClient(CB, TOKEN, policy=policy, ca_bundle=Path("/nonexistent/ca.pem"))


def test_token_is_not_in_repr(policy: OutboundPolicy) -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json={}))
    assert TOKEN not in repr(client_for(recorder, policy))


# --- errors and retries -------------------------------------------------------------------------


def test_503_twice_then_200_is_retried(policy: OutboundPolicy) -> None:
    answers = iter([httpx.Response(503), httpx.Response(503), httpx.Response(200, json=[stored(1, "v1")])])
    recorder = Recorder(lambda request: next(answers))
    with client_for(recorder, policy) as client:
        results = client.list_results(APP, SLIDE)
    assert [r.id for r in results] == [1]
    assert len(recorder.requests) == 3


def test_a_client_with_a_deadline_stops_retrying_when_its_time_is_up(policy: OutboundPolicy) -> None:
    # Sectra overloaded, asking for 30 s of patience on every answer: within a webhook (deadline 1 s
    # here, 20 s in production) the client gives up in time for API Gateway's 29 s, instead of
    # sleeping through four Retry-Afters.
    recorder = Recorder(lambda request: httpx.Response(503, headers={"Retry-After": "30"}))
    with (
        client_for(recorder, policy, retries=4, timeout_s=8.0, deadline_s=1.0) as client,
        pytest.raises(SectraUnavailableError, match="deadline reached"),
    ):
        client.get_slide_info(SLIDE)
    assert len(recorder.requests) == 1
    # Each attempt's timeout is what is left of the deadline, not the full 8 s.
    assert recorder.requests[0].extensions["timeout"]["read"] <= 1.0


def test_without_a_deadline_each_attempt_gets_the_full_timeout(policy: OutboundPolicy) -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json=[stored(1, "v1")]))
    with client_for(recorder, policy, timeout_s=8.0) as client:
        client.list_results(APP, SLIDE)
    assert recorder.requests[0].extensions["timeout"]["read"] == 8.0


def test_persistent_failure_becomes_retryable_error(policy: OutboundPolicy) -> None:
    recorder = Recorder(lambda request: httpx.Response(502, text=f"patient Jane Doe {TOKEN}"))
    with client_for(recorder, policy, retries=2) as client, pytest.raises(SectraUnavailableError) as info:
        client.get_slide_info(SLIDE)
    assert isinstance(info.value, RetryableError)
    assert len(recorder.requests) == 3
    assert "502" in str(info.value)
    assert "Jane" not in str(info.value) and TOKEN not in str(info.value)


def test_connection_errors_and_timeouts_are_retried(policy: OutboundPolicy) -> None:
    failures: list[Exception] = [httpx.ConnectError("refused"), httpx.ReadTimeout("slow")]

    def handler(request: httpx.Request) -> httpx.Response:
        if failures:
            raise failures.pop(0)
        return httpx.Response(200, json={"apiVersion": "1.10"})

    recorder = Recorder(handler)
    with client_for(recorder, policy) as client:
        assert client.get_info().apiVersion == "1.10"
    assert len(recorder.requests) == 3


def test_429_is_retried(policy: OutboundPolicy) -> None:
    answers = iter([httpx.Response(429, headers={"Retry-After": "0"}), httpx.Response(200, json={})])
    recorder = Recorder(lambda request: next(answers))
    with client_for(recorder, policy) as client:
        client.get_info()
    assert len(recorder.requests) == 2


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_are_not_retried_and_leak_nothing(policy: OutboundPolicy, status: int) -> None:
    recorder = Recorder(lambda request: httpx.Response(status, json={"error": "token expired for Jane Doe"}))
    with client_for(recorder, policy) as client, pytest.raises(SectraAuthError) as info:
        client.list_results(APP, SLIDE)
    assert len(recorder.requests) == 1
    message = str(info.value)
    assert str(status) in message and f"/results/slide/{SLIDE}" in message
    assert TOKEN not in message and "Jane" not in message and "pacs.hospital" not in message
    assert info.value.status == status


def test_not_found_and_other_client_errors(policy: OutboundPolicy) -> None:
    answers = iter([httpx.Response(404), httpx.Response(400, text="bad")])
    recorder = Recorder(lambda request: next(answers))
    with client_for(recorder, policy) as client:
        with pytest.raises(SectraNotFoundError):
            client.get_result(APP, 99)
        with pytest.raises(SectraError) as info:
            client.get_result(APP, 99)
    assert info.value.status == 400
    assert len(recorder.requests) == 2


def test_redirect_is_refused_not_followed(policy: OutboundPolicy) -> None:
    recorder = Recorder(
        lambda request: httpx.Response(302, headers={"Location": f"https://pacs.hospital.example{PREFIX}/x"})
    )
    with client_for(recorder, policy) as client, pytest.raises(SectraRedirectError) as info:
        client.get_info()
    assert isinstance(info.value, UrlNotAllowedError)
    assert len(recorder.requests) == 1


def test_non_json_answer_is_a_clear_error(policy: OutboundPolicy) -> None:
    recorder = Recorder(lambda request: httpx.Response(200, text="<html>login</html>"))
    with client_for(recorder, policy) as client, pytest.raises(SectraError, match="not JSON"):
        client.get_info()


# --- create / update / upsert -------------------------------------------------------------------


def placeholder() -> ResultPayload:
    return placeholder_result(SLIDE, W, H, application_version="1.0.0")


def test_post_answered_200_instead_of_201_is_accepted(policy: OutboundPolicy) -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json=stored(5, "v1")))
    with client_for(recorder, policy) as client:
        result = client.create_result(APP, placeholder())
    assert (result.id, result.versionId) == (5, "v1")
    sent = body(recorder.requests[0])
    assert "id" not in sent and "versionId" not in sent
    assert sent["data"]["result"]["type"] == "primitive"


def test_post_timeout_after_sending_adopts_the_created_result(policy: OutboundPolicy) -> None:
    created: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            created.append(stored(7, "v1"))  # the server created it, but the answer is lost
            raise httpx.ReadTimeout("no answer")
        return httpx.Response(200, json=created)

    recorder = Recorder(handler)
    with client_for(recorder, policy) as client:
        result = client.create_result(APP, placeholder(), existing_ids=[])
    assert result.id == 7
    assert recorder.calls() == [f"POST /applications/{APP}/results", f"GET /applications/{APP}/results/slide/{SLIDE}"]


def test_post_5xx_without_creation_is_sent_again(policy: OutboundPolicy) -> None:
    answers = iter([httpx.Response(502), httpx.Response(200, json=[]), httpx.Response(201, json=stored(8, "v1"))])
    recorder = Recorder(lambda request: next(answers))
    with client_for(recorder, policy) as client:
        assert client.create_result(APP, placeholder()).id == 8
    assert [c.split()[0] for c in recorder.calls()] == ["POST", "GET", "POST"]


def test_post_ignores_older_results_when_adopting(policy: OutboundPolicy) -> None:
    # Someone else's (older) result with the same text is not mistaken for ours.
    answers = iter(
        [httpx.Response(504), httpx.Response(200, json=[stored(2, "v9")]), httpx.Response(201, json=stored(9, "v1"))]
    )
    recorder = Recorder(lambda request: next(answers))
    with client_for(recorder, policy) as client:
        assert client.create_result(APP, placeholder(), existing_ids=[2]).id == 9


def test_post_connect_error_is_retried_without_listing(policy: OutboundPolicy) -> None:
    failures = [httpx.ConnectError("refused")]

    def handler(request: httpx.Request) -> httpx.Response:
        if failures:
            raise failures.pop()
        return httpx.Response(201, json=stored(3, "v1"))

    recorder = Recorder(handler)
    with client_for(recorder, policy) as client:
        assert client.create_result(APP, placeholder()).id == 3
    assert [c.split()[0] for c in recorder.calls()] == ["POST", "POST"]


def test_update_sends_id_and_version(policy: OutboundPolicy) -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json=stored(4, "v2", text="Analysing… 40 %")))
    payload = progress_result(SLIDE, W, H, application_version="1.0.0", progress_pct=40)
    with client_for(recorder, policy) as client:
        with pytest.raises(ValueError, match="versionId"):
            client.update_result(APP, 4, payload)
        result = client.update_result(APP, 4, payload.model_copy(update={"versionId": "v1"}))
    assert result.versionId == "v2"
    assert recorder.calls() == [f"PUT /applications/{APP}/results/4"]
    sent = body(recorder.requests[0])
    assert (sent["id"], sent["versionId"], sent["displayProperties"]) == (4, "v1", {"Progress": "40 %"})


def test_update_with_a_stored_result_sends_it_back_as_received(policy: OutboundPolicy) -> None:
    """A pathologist's edit (modify) may hold shapes our strict models refuse: it is PUT unchanged."""
    edited = StoredResult.model_validate(
        {
            "id": 6,
            "versionId": "v4",
            "slideId": SLIDE,
            "displayResult": "edited",
            "data": {"context": None, "result": {"type": "primitive", "content": {"arcs": [{"radius": 0.1}]}}},
            "futureField": [1, 2],
        }
    )
    recorder = Recorder(lambda request: httpx.Response(200, json=stored(6, "v5")))
    with client_for(recorder, policy) as client:
        assert client.update_result(APP, 6, edited).versionId == "v5"
    sent = body(recorder.requests[0])
    assert sent["data"] == edited.data
    assert (sent["id"], sent["versionId"], sent["futureField"]) == (6, "v4", [1, 2])


def test_put_without_body_is_followed_by_a_get(policy: OutboundPolicy) -> None:
    answers = iter([httpx.Response(204), httpx.Response(200, json=stored(4, "v3"))])
    recorder = Recorder(lambda request: next(answers))
    with client_for(recorder, policy) as client:
        result = client.update_result(APP, 4, placeholder().model_copy(update={"versionId": "v2"}))
    assert result.versionId == "v3"
    assert recorder.calls() == [f"PUT /applications/{APP}/results/4", f"GET /applications/{APP}/results/4"]


def test_upsert_without_results_posts(policy: OutboundPolicy) -> None:
    answers = iter([httpx.Response(200, json=[]), httpx.Response(201, json=stored(1, "v1"))])
    recorder = Recorder(lambda request: next(answers))
    with client_for(recorder, policy) as client:
        assert client.upsert_result(APP, SLIDE, placeholder()).id == 1
    assert [c.split()[0] for c in recorder.calls()] == ["GET", "POST"]


def test_upsert_puts_to_the_last_existing_result(policy: OutboundPolicy) -> None:
    answers = iter(
        [httpx.Response(200, json=[stored(1, "a"), stored(2, "b")]), httpx.Response(200, json=stored(2, "c"))]
    )
    recorder = Recorder(lambda request: next(answers))
    with client_for(recorder, policy) as client:
        result = client.upsert_result(APP, SLIDE, placeholder())
    assert (result.id, result.versionId) == (2, "c")
    assert recorder.calls()[1] == f"PUT /applications/{APP}/results/2"
    assert body(recorder.requests[1])["versionId"] == "b"


@pytest.mark.parametrize("status", [409, 412])
def test_stale_version_relists_and_retries_once(policy: OutboundPolicy, status: int) -> None:
    answers = iter(
        [
            httpx.Response(status),
            httpx.Response(200, json=[stored(2, "fresh")]),
            httpx.Response(200, json=stored(2, "newer")),
        ]
    )
    recorder = Recorder(lambda request: next(answers))
    current = StoredResult.model_validate(stored(2, "stale"))
    payload = message_result(SLIDE, W, H, application_version="1.0.0", text="Analysis cancelled")
    with client_for(recorder, policy) as client:
        result = client.upsert_result(APP, SLIDE, payload, current=current)
    assert result.versionId == "newer"
    assert [c.split()[0] for c in recorder.calls()] == ["PUT", "GET", "PUT"]
    assert [body(r)["versionId"] for r in recorder.requests if r.method == "PUT"] == ["stale", "fresh"]


def test_stale_version_twice_raises_conflict(policy: OutboundPolicy) -> None:
    answers = iter([httpx.Response(409), httpx.Response(200, json=[stored(2, "b")]), httpx.Response(409)])
    recorder = Recorder(lambda request: next(answers))
    with client_for(recorder, policy) as client, pytest.raises(SectraConflictError):
        client.upsert_result(APP, SLIDE, placeholder(), current=StoredResult.model_validate(stored(2, "a")))


def test_upsert_refuses_a_payload_for_another_slide(policy: OutboundPolicy) -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json=[]))
    with client_for(recorder, policy) as client, pytest.raises(ValueError):
        client.upsert_result(APP, "other-slide", placeholder())
    assert recorder.requests == []


# --- slide files --------------------------------------------------------------------------------


def multipart(boundary: str, parts: list[tuple[str | None, bytes]], *, preamble: bytes = b"") -> bytes:
    out = [preamble]
    for disposition, content in parts:
        headers = f"--{boundary}\r\n"
        if disposition is not None:
            headers += f"Content-Disposition: {disposition}\r\n"
        headers += f"Content-Type: application/dicom\r\nContent-Length: {len(content)}\r\n\r\n"
        out += [headers.encode(), content, b"\r\n"]
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def dicom_like(seed: int, size: int, boundary: str) -> bytes:
    """Random bytes with DICM magic, CRLFs and near-miss boundary prefixes inside."""
    data = bytearray(os.urandom(size))
    data[128:132] = b"DICM"
    trap = f"\r\n--{boundary[:-1]}".encode()  # all but the last boundary byte
    for offset in range(1000 + seed, size - 100, 300_007):
        data[offset : offset + len(trap)] = trap
    return bytes(data)


def streamed(content: bytes, piece: int = 65_521) -> Iterator[bytes]:
    for start in range(0, len(content), piece):
        yield content[start : start + piece]


def test_multipart_related_series_is_written_part_by_part(policy: OutboundPolicy, tmp_path: Path) -> None:
    boundary = "DICOM-boundary-3f2a"
    parts = [dicom_like(i, size, boundary) for i, size in enumerate([2_500_000, 1_048_576, 777])]
    names = [
        'attachment; filename="i0000,0000b.dcm"',
        "attachment; filename=..\\..\\etc\\i0000,0001b.dcm",  # Windows-style traversal, unquoted
        'attachment; filename="/abs/path/i0000,0000b.dcm"',  # duplicate of the first after sanitising
    ]
    content = multipart(boundary, list(zip(names, parts, strict=True)))
    seen: list[tuple[int, int | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary="{boundary}"'}
        return httpx.Response(200, headers=headers, content=streamed(content))

    recorder = Recorder(handler)
    dest = tmp_path / "job"
    with client_for(recorder, policy) as client:
        paths = client.download_slide_files(SLIDE, dest, progress=lambda done, total: seen.append((done, total)))
    assert [p.name for p in paths] == ["i0000,0000b.dcm", "i0000,0001b.dcm", "i0000,0000b-2.dcm"]
    assert all(p.parent == dest for p in paths)
    assert sorted(dest.iterdir()) == sorted(paths)
    for path, expected in zip(paths, parts, strict=True):
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(expected).digest()
    assert seen[-1][0] == len(content)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert recorder.requests[0].headers["accept"] != "application/json"


@pytest.mark.parametrize("before_edge", [1, 5, 17])
def test_delimiter_and_near_misses_split_across_read_chunks(
    policy: OutboundPolicy, tmp_path: Path, before_edge: int
) -> None:
    """The client reads 1 MiB chunks; a delimiter (or a near miss) cut by a chunk edge must still parse."""
    boundary = "edge-boundary"
    probe = multipart(boundary, [('attachment; filename="a.bin"', b"\0" * (1 << 20))])
    header = probe.index(b"\0")
    # Part a ends so that its closing "\r\n--edge-boundary" starts `before_edge` bytes before 1 MiB.
    first = bytearray(os.urandom((1 << 20) - header - before_edge))
    # Part b holds a near miss that straddles the 2 MiB edge.
    second = bytearray(os.urandom(1 << 20))
    trap = f"\r\n--{boundary[:-1]}".encode()
    content = multipart(
        boundary, [('attachment; filename="a.bin"', bytes(first)), ('attachment; filename="b.bin"', bytes(second))]
    )
    start_b = content.index(b'filename="b.bin"')
    start_b = content.index(b"\r\n\r\n", start_b) + 4
    at = (2 << 20) - before_edge - start_b
    second[at : at + len(trap)] = trap
    content = multipart(
        boundary, [('attachment; filename="a.bin"', bytes(first)), ('attachment; filename="b.bin"', bytes(second))]
    )
    assert content.index(f"\r\n--{boundary}".encode(), header) == (1 << 20) - before_edge
    recorder = Recorder(
        lambda request: httpx.Response(
            200, headers={"Content-Type": f"multipart/related; boundary={boundary}"}, content=content
        )
    )
    with client_for(recorder, policy) as client:
        paths = client.download_slide_files(SLIDE, tmp_path)
    assert [p.read_bytes() for p in paths] == [bytes(first), bytes(second)]


def test_multipart_form_data_with_preamble_and_dicom_names_without_extension(
    policy: OutboundPolicy, tmp_path: Path
) -> None:
    boundary = "mock_boundary"
    series = dicom_like(0, 5000, boundary)
    other = b"II*\x00" + os.urandom(3000)
    content = multipart(
        boundary,
        [('attachment; filename="i0000,0002b"', series), ('form-data; name="f"; filename=".."', other), (None, b"xyz")],
        preamble=b"This is a multi-part message in MIME format.\r\n",
    )
    recorder = Recorder(
        lambda request: httpx.Response(
            200, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, content=content
        )
    )
    with client_for(recorder, policy) as client:
        paths = client.download_slide_files(SLIDE, tmp_path)
    # DICOM magic → ".dcm" appended; ".." and a missing name get neutral fallbacks.
    assert [p.name for p in paths] == ["i0000,0002b.dcm", "file-2", "file-3"]
    assert [p.read_bytes() for p in paths] == [series, other, b"xyz"]


def test_real_dicom_series_as_multipart_related_opens_with_openslide(
    policy: OutboundPolicy, tmp_path: Path, small_dicom_slide: list[Path]
) -> None:
    """Parts named like Sectra's (no extension) land as .dcm siblings OpenSlide opens as one slide."""
    import openslide  # noqa: PLC0415 - only this test needs the native library

    boundary = "Sectra-1a2b3c"
    names = [f"i0000,{i:04d}b" for i in range(len(small_dicom_slide))]

    def body() -> Iterator[bytes]:
        for name, path in zip(names, small_dicom_slide, strict=True):
            yield f'--{boundary}\r\nContent-Disposition: attachment; filename="{name}"\r\n'.encode()
            yield b"Content-Type: application/dicom\r\n\r\n"
            with path.open("rb") as file:
                while chunk := file.read(300_000):
                    yield chunk
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    recorder = Recorder(
        lambda request: httpx.Response(
            200,
            headers={"Content-Type": f"multipart/related; type=application/dicom; boundary={boundary}"},
            content=body(),
        )
    )
    with client_for(recorder, policy) as client:
        paths = client.download_slide_files(SLIDE, tmp_path / "series")
    assert [p.name for p in paths] == [f"{name}.dcm" for name in names]
    for got, sent in zip(paths, small_dicom_slide, strict=True):
        assert got.read_bytes() == sent.read_bytes()
    with openslide.OpenSlide(paths[0]) as slide:
        assert slide.dimensions == (2048, 1536)


@pytest.mark.parametrize("disposition", ["attachment; filename=slide 1.svs", 'attachment; filename="slide 1.svs"'])
def test_single_file_octet_stream_with_quoted_or_unquoted_name(
    policy: OutboundPolicy, tmp_path: Path, disposition: str
) -> None:
    content = os.urandom(3_000_000)
    recorder = Recorder(
        lambda request: httpx.Response(
            200,
            headers={"Content-Type": "application/octet-stream", "Content-Disposition": disposition},
            content=streamed(content),
        )
    )
    with client_for(recorder, policy) as client:
        (path,) = client.download_slide_files(SLIDE, tmp_path)
    assert path == tmp_path / "slide 1.svs"
    assert path.read_bytes() == content


def test_single_file_traversal_name_stays_inside(policy: OutboundPolicy, tmp_path: Path) -> None:
    dest = tmp_path / "inside"
    recorder = Recorder(
        lambda request: httpx.Response(
            200,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Disposition": 'attachment; filename="../../outside.svs"',
            },
            content=b"data",
        )
    )
    with client_for(recorder, policy) as client:
        (path,) = client.download_slide_files(SLIDE, dest)
    assert path == dest / "outside.svs"
    assert not (tmp_path / "outside.svs").exists()


def test_existing_files_are_never_overwritten(policy: OutboundPolicy, tmp_path: Path) -> None:
    (tmp_path / "slide.svs").write_bytes(b"keep me")
    recorder = Recorder(
        lambda request: httpx.Response(
            200,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Disposition": "attachment; filename=slide.svs",
            },
            content=b"new",
        )
    )
    with client_for(recorder, policy) as client:
        (path,) = client.download_slide_files(SLIDE, tmp_path)
    assert path.name == "slide-2.svs" and path.read_bytes() == b"new"
    assert (tmp_path / "slide.svs").read_bytes() == b"keep me"


def test_broken_stream_is_downloaded_again_without_leftovers(policy: OutboundPolicy, tmp_path: Path) -> None:
    boundary = "b0undary"
    parts = [os.urandom(1_500_000), os.urandom(10_000)]
    content = multipart(
        boundary, [('attachment; filename="a.dcm"', parts[0]), ('attachment; filename="b.dcm"', parts[1])]
    )
    attempts: list[int] = []

    def broken() -> Iterator[bytes]:
        yield content[:1_200_000]
        raise httpx.ReadError("connection reset")

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        stream = broken() if len(attempts) == 1 else streamed(content)
        return httpx.Response(200, headers={"Content-Type": f"multipart/related; boundary={boundary}"}, content=stream)

    recorder = Recorder(handler)
    with client_for(recorder, policy) as client:
        paths = client.download_slide_files(SLIDE, tmp_path)
    assert [p.name for p in paths] == ["a.dcm", "b.dcm"]
    assert [p.read_bytes() for p in paths] == parts
    assert sorted(tmp_path.iterdir()) == paths


def test_truncated_multipart_fails_retryably_and_cleans_up(policy: OutboundPolicy, tmp_path: Path) -> None:
    boundary = "b0undary"
    content = multipart(boundary, [('attachment; filename="a.dcm"', os.urandom(5000))])
    truncated = content[: -len(f"--{boundary}--\r\n") - 2]
    recorder = Recorder(
        lambda request: httpx.Response(
            200, headers={"Content-Type": f"multipart/related; boundary={boundary}"}, content=truncated
        )
    )
    with client_for(recorder, policy, retries=1) as client, pytest.raises(SectraUnavailableError):
        client.download_slide_files(SLIDE, tmp_path)
    assert len(recorder.requests) == 2
    assert list(tmp_path.iterdir()) == []


def test_multipart_without_boundary_is_an_error(policy: OutboundPolicy, tmp_path: Path) -> None:
    recorder = Recorder(
        lambda request: httpx.Response(200, headers={"Content-Type": "multipart/related"}, content=b"x")
    )
    with client_for(recorder, policy) as client, pytest.raises(SectraError, match="boundary"):
        client.download_slide_files(SLIDE, tmp_path)


def test_files_401_is_an_auth_error(policy: OutboundPolicy, tmp_path: Path) -> None:
    recorder = Recorder(lambda request: httpx.Response(401))
    with client_for(recorder, policy) as client, pytest.raises(SectraAuthError):
        client.download_slide_files(SLIDE, tmp_path)
    assert len(recorder.requests) == 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("i0000,0000b.dcm", "i0000,0000b.dcm"),
        ("..\\..\\Windows\\evil.dll", "evil.dll"),
        ("/etc/passwd", "passwd"),
        ("a/b/../..", None),
        ("..", None),
        (".", None),
        ("", None),
        ("  ", None),
        ("dir/", None),
        ("bad\x00name\n.svs", "bad_name_.svs"),
        ("x" * 300 + ".svs", "x" * 251 + ".svs"),
    ],
)
def test_safe_filename(raw: str, expected: str | None) -> None:
    assert safe_filename(raw) == expected


# --- against the MockSectraServer (loopback) ----------------------------------------------------


@pytest.fixture(scope="module")
def mock_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_slide(tmp_path_factory.mktemp("mock-slide") / "small.svs", 2048, 1536)


@pytest.fixture(scope="module")
def mock_server(mock_slide: Path) -> Iterator[MockSectraServer]:
    server = MockSectraServer(token=TOKEN, slide_files={"s-file": [mock_slide]})
    with server.run(port=0, host="127.0.0.1"):
        yield server


@pytest.fixture
def mock_client(mock_server: MockSectraServer) -> Iterator[SectraClient]:
    loopback = OutboundPolicy({Purpose.SECTRA_CALLBACK: ["127.0.0.1"]})
    with SectraClient(mock_server.url + "/", TOKEN, policy=loopback, timeout_s=10, backoff_s=0) as client:
        yield client


def test_mock_create_update_upsert_flow(mock_server: MockSectraServer, mock_client: SectraClient) -> None:
    slide = "s-flow"
    info = mock_client.get_slide_info(slide)
    assert info.dimensions == (100_000, 80_000)
    width, height = info.dimensions
    created = mock_client.upsert_result(
        APP, slide, placeholder_result(slide, width, height, application_version="1.0.0")
    )
    assert isinstance(created.id, int) and created.versionId
    progressed = mock_client.upsert_result(
        APP, slide, progress_result(slide, width, height, application_version="1.0.0", progress_pct=40), current=created
    )
    assert progressed.id == created.id and progressed.versionId != created.versionId
    # Without `current`: listed, and the last result is updated rather than a second one created.
    final = mock_client.upsert_result(
        APP,
        slide,
        progress_result(slide, width, height, application_version="1.0.0", progress_pct=90, context={"run": "r1"}),
    )
    assert final.id == created.id
    (only,) = mock_client.list_results(APP, slide)
    assert only.displayResult == "Analysing… 90 %"
    assert only.data is not None and only.data["context"] == {"run": "r1"}
    assert only.displayProperties == {"Progress": "90 %"}
    cancelled = mock_client.update_result(
        APP,
        final.id,
        message_result(slide, width, height, application_version="1.0.0", text="Analysis cancelled").model_copy(
            update={"versionId": final.versionId}
        ),
    )
    assert mock_server.get_results(APP, slide)[0].displayResult == "Analysis cancelled" == cancelled.displayResult


def test_mock_rejects_a_wrong_token(mock_server: MockSectraServer) -> None:
    loopback = OutboundPolicy({Purpose.SECTRA_CALLBACK: ["127.0.0.1"]})
    with SectraClient(mock_server.url, "wrong", policy=loopback, backoff_s=0) as client, pytest.raises(SectraAuthError):
        client.get_info()


def test_mock_multipart_download_of_a_real_slide(mock_client: SectraClient, mock_slide: Path, tmp_path: Path) -> None:
    (path,) = mock_client.download_slide_files("s-file", tmp_path / "dl")
    assert path.name == "small.svs"
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(mock_slide.read_bytes()).digest()
