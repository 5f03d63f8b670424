"""The local API Gateway: the proxy event it builds, the limits it enforces, how it survives handlers."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from local.gateway import MAX_BODY_BYTES, Gateway, build_event, decode_path

OK_RESPONSE = {
    "statusCode": 200,
    "headers": {"Content-Type": "application/json"},
    "body": json.dumps({"ok": True}),
    "isBase64Encoded": False,
}


class RecordingHandler:
    """A fake Lambda handler: records each event and context, answers with a fixed proxy response."""

    def __init__(self, response: Any = OK_RESPONSE, error: Exception | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.contexts: list[Any] = []
        self.response = response
        self.error = error

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        self.events.append(event)
        self.contexts.append(context)
        if self.error is not None:
            raise self.error
        return self.response


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def gateway(handler: RecordingHandler) -> Iterator[Gateway]:
    with Gateway(handler, host="127.0.0.1", port=0) as gw:
        yield gw


def raw_request(gw: Gateway, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> Any:
    """Send the request target byte for byte (httpx would normalise the path)."""
    conn = http.client.HTTPConnection(gw.host, gw.port, timeout=30)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# --- the event ------------------------------------------------------------------------------------


def test_repeated_query_parameters_fill_both_maps(gateway: Gateway, handler: RecordingHandler) -> None:
    status, _, _ = raw_request(gateway, "GET", "/api/v1/runs?sort=submitted_at&sort=-run_id&page=2", {})

    assert status == 200
    event = handler.events[0]
    assert event["multiValueQueryStringParameters"] == {"sort": ["submitted_at", "-run_id"], "page": ["2"]}
    # API Gateway's single-value map keeps the last occurrence.
    assert event["queryStringParameters"] == {"sort": "-run_id", "page": "2"}


def test_unencoded_plus_in_query_arrives_as_space() -> None:
    # The Platform API client sends sort=+name unencoded; the handler strips the leading space.
    event = build_event(
        "GET",
        "/api/v1/applications?sort=+name&custom_metadata=%24.study%20%3F%20(%40%20%3D%3D%20%22a%22)",
        [],
        b"",
        source_ip="127.0.0.1",
        request_id="r",
        request_time_ms=0,
    )
    assert event["queryStringParameters"]["sort"] == " name"
    assert event["queryStringParameters"]["custom_metadata"] == '$.study ? (@ == "a")'


def test_no_query_and_no_body_are_null(gateway: Gateway, handler: RecordingHandler) -> None:
    raw_request(gateway, "GET", "/api/v1/me", {})

    event = handler.events[0]
    assert event["queryStringParameters"] is None
    assert event["multiValueQueryStringParameters"] is None
    assert event["body"] is None
    assert event["isBase64Encoded"] is False
    assert event["stageVariables"] is None


def test_encoded_slash_in_a_segment_stays_encoded(gateway: Gateway, handler: RecordingHandler) -> None:
    raw_request(gateway, "GET", "/api/v1/runs/r-1/items/data%2fcase%201%2Fslide%C3%A9.svs", {})

    event = handler.events[0]
    # Decoded once, except the encoded slashes, which would otherwise split the external_id.
    assert event["path"] == "/api/v1/runs/r-1/items/data%2Fcase 1%2Fslideé.svs"
    assert event["resource"] == "/{proxy+}"
    assert event["pathParameters"] == {"proxy": "api/v1/runs/r-1/items/data%2Fcase 1%2Fslideé.svs"}
    assert event["requestContext"]["path"] == event["path"]
    assert event["requestContext"]["resourcePath"] == "/{proxy+}"


def test_encoded_percent_stays_encoded_so_one_unquote_restores_the_id() -> None:
    # external_id "100%2F" (a literal percent sign) arrives as 100%252F from a client that encodes once.
    assert decode_path("/items/100%252F") == "/items/100%252F"
    assert decode_path("/items/a%20b") == "/items/a b"


def test_root_path_has_no_proxy_parameter() -> None:
    event = build_event("GET", "/", [], b"", source_ip="127.0.0.1", request_id="r", request_time_ms=0)
    assert event["resource"] == "/"
    assert event["pathParameters"] is None


def test_headers_keep_names_as_sent_and_repeats(gateway: Gateway, handler: RecordingHandler) -> None:
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=30)
    conn.putrequest("GET", "/api/v1/me", skip_accept_encoding=True)
    conn.putheader("Authorization", "Bearer t0k")
    conn.putheader("X-Trace-ID", "a")
    conn.putheader("X-Trace-ID", "b")
    conn.endheaders()
    conn.getresponse().read()
    conn.close()

    event = handler.events[0]
    assert event["headers"]["Authorization"] == "Bearer t0k"
    assert event["headers"]["X-Trace-ID"] == "b"
    assert event["multiValueHeaders"]["X-Trace-ID"] == ["a", "b"]
    assert event["headers"]["X-Forwarded-For"] == "127.0.0.1"


def test_request_context_and_lambda_context(gateway: Gateway, handler: RecordingHandler) -> None:
    status, headers, _ = raw_request(gateway, "DELETE", "/api/v1/runs/abc/artifacts", {})

    assert status == 200
    event, context = handler.events[0], handler.contexts[0]
    ctx = event["requestContext"]
    assert event["httpMethod"] == ctx["httpMethod"] == "DELETE"
    assert ctx["stage"] == "local"
    assert ctx["identity"]["sourceIp"] == "127.0.0.1"
    assert isinstance(ctx["requestTimeEpoch"], int) and ctx["requestTimeEpoch"] > 1_600_000_000_000
    assert ctx["requestId"] == context.aws_request_id == headers["x-amzn-RequestId"]
    assert context.function_name and context.invoked_function_arn.startswith("arn:aws:lambda:")
    assert 0 < context.get_remaining_time_in_millis() <= 29_000
    assert context.memory_limit_in_mb > 0


def test_json_body_is_passed_as_text(gateway: Gateway, handler: RecordingHandler) -> None:
    payload = {"application_id": "he-tissue", "note": "Grüße"}
    response = httpx.post(f"{gateway.url}/api/v1/runs", json=payload)

    assert response.status_code == 200
    event = handler.events[0]
    assert event["isBase64Encoded"] is False
    assert json.loads(event["body"]) == payload


def test_binary_body_is_base64(gateway: Gateway, handler: RecordingHandler) -> None:
    blob = bytes(range(256))
    httpx.post(f"{gateway.url}/upload", content=blob, headers={"Content-Type": "application/octet-stream"})

    event = handler.events[0]
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == blob


def test_chunked_body_is_reassembled(gateway: Gateway, handler: RecordingHandler) -> None:
    def parts() -> Iterator[bytes]:
        yield b'{"a": '
        yield b"1}"

    response = httpx.post(f"{gateway.url}/hooks/x", content=parts())

    assert response.status_code == 200
    assert json.loads(handler.events[0]["body"]) == {"a": 1}


# --- limits ---------------------------------------------------------------------------------------


def test_body_over_10_mb_gets_413_without_calling_the_handler(gateway: Gateway, handler: RecordingHandler) -> None:
    response = httpx.post(f"{gateway.url}/api/v1/runs", content=b"x" * (MAX_BODY_BYTES + 1), timeout=60)

    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"
    assert "detail" in response.json()
    assert handler.events == []


def test_body_of_exactly_10_mb_is_accepted(gateway: Gateway, handler: RecordingHandler) -> None:
    response = httpx.post(f"{gateway.url}/api/v1/runs", content=b"x" * MAX_BODY_BYTES, timeout=60)

    assert response.status_code == 200
    assert len(handler.events[0]["body"]) == MAX_BODY_BYTES


def test_chunked_body_over_the_limit_gets_413(handler: RecordingHandler) -> None:
    def parts() -> Iterator[bytes]:
        for _ in range(5):
            yield b"y" * 400

    with Gateway(handler, port=0, max_body_bytes=1000) as gw:
        response = httpx.post(f"{gw.url}/hooks/x", content=parts())

    assert response.status_code == 413
    assert handler.events == []


def test_expect_continue_over_the_limit_is_refused_before_the_body(handler: RecordingHandler) -> None:
    with (
        Gateway(handler, port=0, max_body_bytes=1000) as gw,
        socket.create_connection((gw.host, gw.port)) as sock,
    ):
        sock.sendall(b"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        reply = sock.recv(65536)

    assert reply.startswith(b"HTTP/1.1 413")
    assert handler.events == []


def test_malformed_content_length_is_a_400(gateway: Gateway, handler: RecordingHandler) -> None:
    with socket.create_connection((gateway.host, gateway.port)) as sock:
        sock.sendall(b"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n")
        reply = sock.recv(65536)

    assert reply.startswith(b"HTTP/1.1 400")
    assert handler.events == []


# --- handler failures and responses ----------------------------------------------------------------


def test_handler_exception_becomes_500_json_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    failing = RecordingHandler(error=RuntimeError("boom"))
    with caplog.at_level(logging.ERROR, logger="local.gateway"), Gateway(failing, port=0) as gw:
        first = httpx.get(f"{gw.url}/api/v1/runs")
        second = httpx.get(f"{gw.url}/api/v1/runs")  # the gateway keeps serving

    assert first.status_code == second.status_code == 500
    assert first.json() == {"detail": "internal error"}
    assert first.headers["content-type"] == "application/json"
    assert any(record.exc_info and "boom" in str(record.exc_info[1]) for record in caplog.records)


@pytest.mark.parametrize(
    "bad_response",
    [None, {"body": "no status"}, {"statusCode": "200"}, {"statusCode": 200, "body": {"not": "a string"}}],
)
def test_malformed_proxy_response_becomes_502(bad_response: Any) -> None:
    with Gateway(RecordingHandler(response=bad_response), port=0) as gw:
        response = httpx.get(f"{gw.url}/x")
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"


def test_response_headers_status_and_base64_body_are_written() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
    proxy_response = {
        "statusCode": 307,
        "headers": {"Location": "http://127.0.0.1:1/x", "X-One": "single"},
        "multiValueHeaders": {"Set-Cookie": ["a=1", "b=2"], "X-One": ["multi"]},
        "body": base64.b64encode(png).decode(),
        "isBase64Encoded": True,
    }
    with Gateway(RecordingHandler(response=proxy_response), port=0) as gw:
        response = httpx.get(f"{gw.url}/file")

    assert response.status_code == 307
    assert response.headers["location"] == "http://127.0.0.1:1/x"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert response.headers.get_list("x-one") == ["multi"]  # multiValueHeaders wins, as in API Gateway
    assert response.headers["content-type"] == "application/json"  # API Gateway's default
    assert response.content == png


def test_head_gets_headers_without_body(gateway: Gateway) -> None:
    status, headers, body = raw_request(gateway, "HEAD", "/api/v1/me", {})
    assert status == 200
    assert body == b""
    assert int(headers["Content-Length"]) == 0
