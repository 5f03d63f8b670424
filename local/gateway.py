"""A local stand-in for API Gateway (REST API, Lambda proxy integration on ``/{proxy+}``).

Each HTTP request becomes the proxy event API Gateway would build, the Lambda handler is called with
it, and its proxy response is written back. The API Gateway limits that clients can notice are kept:
request bodies over 10 MB are refused with 413 before the handler sees them, a handler that raises
gives a 500 JSON body (never a dropped connection), a malformed proxy response gives 502.

Paths are percent-decoded exactly once, except ``%2F`` and ``%25``, which stay encoded (normalised to
upper case). ``%2F`` must stay encoded so that an encoded slash inside a path parameter (the Platform API
uses file paths as ``external_id``: ``/runs/{id}/items/dir%2Fslide.svs``) is not mistaken for a segment
boundary; ``%25`` stays encoded with it so that the router's single ``unquote`` of a path parameter is
unambiguous (``a%252Fb`` must become ``a%2Fb``, not ``a/b``). Everything else (``%20``, UTF-8 escapes)
arrives decoded. The router therefore decodes path parameter values once more with
``urllib.parse.unquote``.

The stdlib ``ThreadingHTTPServer`` is enough here (one loopback client, no TLS) and keeps byte-exact
control over the request line and body, which a WSGI layer would normalise away.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_BODY_BYTES",
    "Gateway",
    "Handler",
    "LambdaContext",
    "build_event",
    "decode_path",
]

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]

# API Gateway's payload limit: 10 MB (AWS quotes it as 10 MB = 10 * 1024 * 1024 bytes).
MAX_BODY_BYTES = 10 * 1024 * 1024
# An over-limit body announced by Content-Length is read and discarded up to this size so that the
# client, still busy sending, receives the 413 instead of a connection reset; larger ones are cut off.
_DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
# API Gateway's integration timeout; reported to the handler through the Lambda context.
INTEGRATION_TIMEOUT_MS = 29_000
_READ_CHUNK = 64 * 1024
_KEEP_ENCODED = re.compile(r"(%2[Ff]|%25)")
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}


# --- the event ------------------------------------------------------------------------------------


def decode_path(raw_path: str) -> str:
    """Percent-decode ``raw_path`` once, keeping ``%2F`` and ``%25`` encoded (see module docstring)."""
    parts = _KEEP_ENCODED.split(raw_path)
    # split() with one capture group alternates: text, kept escape, text, kept escape, ...
    return "".join(part.upper() if index % 2 else unquote(part, errors="replace") for index, part in enumerate(parts))


def _query_maps(query: str) -> tuple[dict[str, str] | None, dict[str, list[str]] | None]:
    if not query:
        return None, None
    multi: dict[str, list[str]] = {}
    for name, value in parse_qsl(query, keep_blank_values=True, errors="replace"):
        multi.setdefault(name, []).append(value)
    if not multi:
        return None, None
    # API Gateway's single-value map carries the last occurrence of a repeated parameter.
    return {name: values[-1] for name, values in multi.items()}, multi


def _body_field(body: bytes) -> tuple[str | None, bool]:
    if not body:
        return None, False
    try:
        return body.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), True


def build_event(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    source_ip: str,
    request_id: str,
    request_time_ms: int,
    stage: str = "local",
) -> dict[str, Any]:
    """The API Gateway REST (v1) proxy event for one request on a ``/{proxy+}`` resource.

    ``target`` is the request target as sent (path and query, still percent-encoded); ``headers`` are
    the header lines in order, names as sent, repeats included.
    """
    if target.startswith("/"):
        # origin-form (the usual case); urlsplit would read a leading "//x" as a host name
        raw_path, _, query_string = target.split("#", 1)[0].partition("?")
    else:
        # absolute-form ("http://host/path?q"), which HTTP/1.1 servers must accept
        split = urlsplit(target)
        raw_path, query_string = split.path, split.query
    path = decode_path(raw_path or "/")
    if not path.startswith("/"):
        path = "/" + path
    query, multi_query = _query_maps(query_string)

    single_headers: dict[str, str] = {}
    multi_headers: dict[str, list[str]] = {}
    for name, value in headers:
        single_headers[name] = value  # the last occurrence wins, as in API Gateway
        multi_headers.setdefault(name, []).append(value)
    lower = {name.lower() for name in single_headers}
    # API Gateway adds these; handlers build absolute URLs and log client addresses from them.
    for name, value in (("X-Forwarded-For", source_ip), ("X-Forwarded-Proto", "http")):
        if name.lower() not in lower:
            single_headers[name] = value
            multi_headers[name] = [value]

    if path == "/":
        resource, path_parameters = "/", None
    else:
        resource, path_parameters = "/{proxy+}", {"proxy": path[1:]}
    body_text, is_base64 = _body_field(body)
    return {
        "resource": resource,
        "path": path,
        "httpMethod": method,
        "headers": single_headers or None,
        "multiValueHeaders": multi_headers or None,
        "queryStringParameters": query,
        "multiValueQueryStringParameters": multi_query,
        "pathParameters": path_parameters,
        "stageVariables": None,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "local",
            "domainName": single_headers.get("Host", "localhost"),
            "httpMethod": method,
            "identity": {"sourceIp": source_ip, "userAgent": single_headers.get("User-Agent")},
            # The custom-domain form (no stage prefix), which is what callers of the local stack see.
            "path": path,
            "protocol": "HTTP/1.1",
            "requestId": request_id,
            "requestTime": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(request_time_ms / 1000)),
            "requestTimeEpoch": request_time_ms,
            "resourceId": "local",
            "resourcePath": resource,
            "stage": stage,
        },
        "body": body_text,
        "isBase64Encoded": is_base64,
    }


@dataclass
class LambdaContext:
    """The parts of the Lambda context object handlers and Powertools read."""

    aws_request_id: str
    function_name: str = "slidebridge-api"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 1024
    invoked_function_arn: str = "arn:aws:lambda:eu-central-1:123456789012:function:slidebridge-api"
    log_group_name: str = "/aws/lambda/slidebridge-api"
    log_stream_name: str = "local"
    deadline_monotonic: float = field(default_factory=lambda: time.monotonic() + INTEGRATION_TIMEOUT_MS / 1000)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline_monotonic - time.monotonic()) * 1000))


# --- the response ---------------------------------------------------------------------------------


class MalformedResponseError(Exception):
    """The handler returned something that is not a Lambda proxy response (API Gateway answers 502)."""


@dataclass
class _HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def _json_response(status: int, payload: dict[str, Any]) -> _HttpResponse:
    return _HttpResponse(status, [("Content-Type", "application/json")], json.dumps(payload).encode("utf-8"))


def _too_large(limit: int) -> _HttpResponse:
    # API Gateway's own message, plus the Platform API's FastAPI-style "detail".
    return _json_response(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        {"message": "Request Too Long", "detail": f"request body exceeds the {limit} byte limit"},
    )


def _from_proxy_response(response: object) -> _HttpResponse:
    if not isinstance(response, dict):
        raise MalformedResponseError(f"handler returned {type(response).__name__}, not a dict")
    status = response.get("statusCode")
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise MalformedResponseError(f"invalid statusCode {status!r}")
    body = response.get("body")
    if body is None:
        raw = b""
    elif isinstance(body, str):
        try:
            raw = base64.b64decode(body, validate=True) if response.get("isBase64Encoded") else body.encode()
        except ValueError as exc:
            raise MalformedResponseError("isBase64Encoded body is not base64") from exc
    else:
        raise MalformedResponseError(f"body must be a string, not {type(body).__name__}")

    headers: list[tuple[str, str]] = []
    multi = response.get("multiValueHeaders") or {}
    single = response.get("headers") or {}
    if not isinstance(multi, dict) or not isinstance(single, dict):
        raise MalformedResponseError("headers/multiValueHeaders must be objects")
    # As in API Gateway, a name present in both maps takes the multiValueHeaders values only.
    multi_names = {str(name).lower() for name in multi}
    for name, value in single.items():
        if str(name).lower() not in multi_names:
            headers.append((str(name), str(value)))
    for name, values in multi.items():
        if not isinstance(values, list):
            raise MalformedResponseError(f"multiValueHeaders[{name!r}] must be a list")
        headers.extend((str(name), str(value)) for value in values)
    headers = [(name, value) for name, value in headers if name.lower() not in _HOP_BY_HOP]
    if not any(name.lower() == "content-type" for name, _ in headers):
        headers.append(("Content-Type", "application/json"))  # API Gateway's default
    return _HttpResponse(status, headers, raw)


# --- the server -----------------------------------------------------------------------------------


class _BodyTooLargeError(Exception):
    pass


class _BadRequestError(Exception):
    pass


class _RequestHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 so that clients keep connections alive; every response carries a Content-Length.
    protocol_version = "HTTP/1.1"
    server_version = "slidebridge-local-gateway"
    # A stalled client must not hold a thread forever.
    timeout = 120
    server: _GatewayServer

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def handle_expect_100(self) -> bool:
        # Refuse an announced over-limit body before the client sends it ("Expect: 100-continue").
        length = (self.headers.get("Content-Length") or "").strip()
        if length.isdigit() and int(length) > self.server.max_body_bytes:
            self.close_connection = True
            self._write(_too_large(self.server.max_body_bytes), str(uuid.uuid4()))
            return False
        return super().handle_expect_100()

    # --- request body -----------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        limit = self.server.max_body_bytes
        transfer_encoding = self.headers.get("Transfer-Encoding", "")
        if transfer_encoding:
            if transfer_encoding.strip().lower() != "chunked":
                raise _BadRequestError(f"unsupported Transfer-Encoding {transfer_encoding!r}")
            return self._read_chunked(limit)
        lengths = {value.strip() for value in self.headers.get_all("Content-Length") or []}
        if not lengths:
            return b""
        if len(lengths) > 1:
            raise _BadRequestError("conflicting Content-Length headers")
        text = lengths.pop()
        if not text.isdigit():
            raise _BadRequestError("invalid Content-Length")
        length = int(text)
        if length > limit:
            if length <= _DRAIN_LIMIT_BYTES:
                self._discard(length)
            raise _BodyTooLargeError
        return self.rfile.read(length)

    def _discard(self, length: int) -> None:
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(_READ_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)

    def _read_chunked(self, limit: int) -> bytes:
        # http.server does not decode chunked bodies; this follows RFC 9112 §7.1 (extensions ignored).
        body = bytearray()
        while True:
            line = self.rfile.readline(1024)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError as exc:
                raise _BadRequestError("malformed chunk size") from exc
            if size < 0:
                raise _BadRequestError("malformed chunk size")
            if size == 0:
                break
            if len(body) + size > limit:
                raise _BodyTooLargeError
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.read(2) != b"\r\n":
                raise _BadRequestError("truncated chunk")
            body += chunk
        # Trailer section: header lines up to an empty line.
        for _ in range(100):
            line = self.rfile.readline(8192)
            if line in (b"\r\n", b"\n", b""):
                break
        return bytes(body)

    # --- dispatch -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        request_id = str(uuid.uuid4())
        try:
            self._dispatch_request(request_id)
        except Exception:
            # Last line of defence: whatever went wrong here, the client gets an answer.
            logger.exception("gateway failure on %s (request %s)", self.command, request_id)
            self.close_connection = True
            self._write(_json_response(HTTPStatus.INTERNAL_SERVER_ERROR, {"detail": "internal error"}), request_id)

    def _dispatch_request(self, request_id: str) -> None:
        request_time_ms = int(time.time() * 1000)
        try:
            body = self._read_body()
        except _BodyTooLargeError:
            self.close_connection = True
            self._write(_too_large(self.server.max_body_bytes), request_id)
            return
        except _BadRequestError as exc:
            self.close_connection = True
            self._write(_json_response(HTTPStatus.BAD_REQUEST, {"detail": str(exc)}), request_id)
            return

        event = build_event(
            self.command,
            self.path,
            list(self.headers.items()),
            body,
            source_ip=self.client_address[0],
            request_id=request_id,
            request_time_ms=request_time_ms,
            stage=self.server.stage,
        )
        context = LambdaContext(aws_request_id=request_id)
        response = self.server.invoke(event, context)
        self._write(response, request_id)

    def _write(self, response: _HttpResponse, request_id: str) -> None:
        body = b"" if self.command == "HEAD" or response.status in (204, 304) else response.body
        try:
            self.send_response(response.status)
            for name, value in response.headers:
                self.send_header(name, value)
            self.send_header("x-amzn-RequestId", request_id)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            logger.info("client went away before the response was written (request %s)", request_id)
            self.close_connection = True


class _GatewayServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: Handler,
        *,
        max_body_bytes: int,
        stage: str,
        serialize: bool,
    ) -> None:
        super().__init__(address, _RequestHandler)
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.stage = stage
        # One Lambda execution environment handles one event at a time, and handlers (Powertools
        # resolvers keep the current event on the app object) rely on that.
        self._invoke_lock: threading.Lock | None = threading.Lock() if serialize else None

    def invoke(self, event: dict[str, Any], context: LambdaContext) -> _HttpResponse:
        try:
            if self._invoke_lock is None:
                result = self.handler(event, context)
            else:
                with self._invoke_lock:
                    result = self.handler(event, context)
        except Exception:
            logger.exception(
                "handler raised on %s %s (request %s)",
                event["httpMethod"],
                event["path"],
                context.aws_request_id,
            )
            return _json_response(HTTPStatus.INTERNAL_SERVER_ERROR, {"detail": "internal error"})
        try:
            return _from_proxy_response(result)
        except MalformedResponseError as exc:
            logger.error("malformed proxy response (request %s): %s", context.aws_request_id, exc)
            return _json_response(HTTPStatus.BAD_GATEWAY, {"message": "Internal server error"})


class Gateway:
    """The local API Gateway: ``start()`` serves in a background thread, ``stop()`` shuts it down."""

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = MAX_BODY_BYTES,
        stage: str = "local",
        serialize: bool = True,
    ) -> None:
        self._server = _GatewayServer(
            (host, port), handler, max_body_bytes=max_body_bytes, stage=stage, serialize=serialize
        )
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> None:
        # The socket is already bound and listening (constructor), so requests queue from here on.
        # A short poll interval only bounds how long stop() waits for the serving loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="gateway", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
