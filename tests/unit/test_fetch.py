"""batch_job.fetch against a loopback server that behaves like S3 presigned GETs."""

from __future__ import annotations

import logging
import random
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from batch_job.fetch import download
from slidebridge.checksums import crc32c_b64_of_bytes, crc32c_b64_of_file
from slidebridge.errors import (
    ChecksumMismatchError,
    DownloadFailedError,
    RetryableError,
    UrlExpiredError,
    UrlForbiddenError,
    UrlNotAllowedError,
)
from slidebridge.outbound import OutboundPolicy, Purpose

MIB = 1024 * 1024
# Odd size, so the last part is short; ~20 MB as a small slide would be.
DATA = random.Random(20).randbytes(20 * MIB + 12_345)
PART = 4 * MIB  # 6 parts
SIGNATURE = "X-Amz-Signature=SECRETSIG0123&X-Amz-Expires=60"

EXPIRED_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message><X-Amz-Expires>60</X-Amz-Expires>"
    b"<Expires>2024-01-01T00:00:00Z</Expires><RequestId>R</RequestId></Error>"
)
FORBIDDEN_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>R</RequestId></Error>"
)
NOT_FOUND_XML = b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>"


@dataclass
class ServerState:
    data: bytes
    redirect_target: str = ""
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    seen_ranges: set[tuple[str, str | None]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def first_time(self, path: str, range_header: str | None) -> bool:
        with self.lock:
            key = (path, range_header)
            if key in self.seen_ranges:
                return False
            self.seen_ranges.add(key)
            return True

    def ranged_gets(self, path: str) -> list[str]:
        with self.lock:
            return [r for m, p, r in self.requests if m == "GET" and p == path and r and r != "bytes=0-0"]


class S3LikeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StateServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        state = self.server.state
        with state.lock:
            state.requests.append(("HEAD", urlsplit(self.path).path, None))
        # S3 presigned GET URLs sign the method: HEAD is refused.
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        state = self.server.state
        path = urlsplit(self.path).path
        range_header = self.headers.get("Range")
        with state.lock:
            state.requests.append(("GET", path, range_header))
        data = state.data
        if path == "/expired":
            return self._send(403, EXPIRED_XML, {"Content-Type": "application/xml"})
        if path == "/forbidden":
            return self._send(403, FORBIDDEN_XML, {"Content-Type": "application/xml"})
        if path == "/missing":
            return self._send(404, NOT_FOUND_XML, {"Content-Type": "application/xml"})
        if path == "/throttled":
            return self._send(503, b"<Error><Code>SlowDown</Code></Error>", {"Retry-After": "0"})
        if path == "/flaky" and state.first_time(path, range_header):
            return self._send(500, b"<Error><Code>InternalError</Code></Error>")
        if path == "/redirect-elsewhere":
            return self._send(307, b"", {"Location": state.redirect_target})
        if path == "/redirect-same":
            return self._send(302, b"", {"Location": "/file?" + SIGNATURE})
        if path == "/empty":
            data = b""
        if path == "/norange" or range_header is None:
            return self._send(200, data, {"ETag": '"e1"'})
        first_s, last_s = range_header.removeprefix("bytes=").split("-")
        if not data:
            return self._send(416, b"", {"Content-Range": "bytes */0"})
        first, last = int(first_s), min(int(last_s), len(data) - 1)
        total = len(data)
        if path == "/grows" and first > 0:
            total += 1  # the object was replaced by a longer one after the size probe
        body = memoryview(data)[first : last + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{total}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"e1"')
        self.end_headers()
        if path == "/truncated" and first > 0 and state.first_time(path, range_header):
            # Dies halfway through the body: the client must notice and fetch the part again.
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return None
        self.wfile.write(body)
        return None


class StateServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: ServerState) -> None:
        super().__init__(("127.0.0.1", 0), S3LikeHandler)
        self.state = state

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that hang up mid-body (aborted downloads) are part of what is tested.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server() -> Iterator[StateServer]:
    srv = StateServer(ServerState(DATA))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def policy() -> OutboundPolicy:
    return OutboundPolicy({Purpose.DOWNLOAD: ["127.0.0.1"]})


def _url(server: StateServer, path: str) -> str:
    return f"{server.base}{path}?{SIGNATURE}"


def _download(server: StateServer, policy: OutboundPolicy, path: str, dest: Path, **kwargs: object) -> object:
    options: dict[str, object] = {
        "expected_crc32c_b64": None,
        "part_size": PART,
        "concurrency": 4,
        "timeout_s": 5.0,
        "retry_backoff_s": 0.01,
    }
    options.update(kwargs)
    return download(_url(server, path), dest, policy=policy, **options)  # type: ignore[arg-type]


def test_parallel_ranged_download_matches_source(server: StateServer, policy: OutboundPolicy, tmp_path: Path) -> None:
    dest = tmp_path / "slide.bin"
    calls: list[tuple[int, int]] = []
    result = download(
        _url(server, "/file"),
        dest,
        policy=policy,
        expected_crc32c_b64=crc32c_b64_of_bytes(DATA),
        part_size=PART,
        concurrency=4,
        timeout_s=5.0,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert result.path == dest
    assert result.size_bytes == len(DATA)
    assert result.crc32c_b64 == crc32c_b64_of_file(dest) == crc32c_b64_of_bytes(DATA)
    assert dest.read_bytes() == DATA
    # One ranged GET per part after the bytes=0-0 size probe; HEAD is never tried.
    assert len(server.state.ranged_gets("/file")) == 6
    assert all(method == "GET" for method, _, _ in server.state.requests)
    assert calls[-1] == (len(DATA), len(DATA))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_part_larger_than_file_is_one_part(server: StateServer, policy: OutboundPolicy, tmp_path: Path) -> None:
    result = _download(server, policy, "/file", tmp_path / "f", part_size=64 * MIB)
    assert result.crc32c_b64 == crc32c_b64_of_bytes(DATA)  # type: ignore[attr-defined]
    assert len(server.state.ranged_gets("/file")) == 1


def test_server_without_range_support_streams_one_get(
    server: StateServer, policy: OutboundPolicy, tmp_path: Path
) -> None:
    dest = tmp_path / "f"
    result = _download(server, policy, "/norange", dest, expected_crc32c_b64=crc32c_b64_of_bytes(DATA))
    assert dest.read_bytes() == DATA
    assert result.crc32c_b64 == crc32c_b64_of_file(dest)  # type: ignore[attr-defined]
    assert [m for m, p, _ in server.state.requests if p == "/norange"] == ["GET"]


def test_empty_object(server: StateServer, policy: OutboundPolicy, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    result = _download(server, policy, "/empty", dest, expected_crc32c_b64="AAAAAA==")
    assert dest.read_bytes() == b""
    assert result.size_bytes == 0  # type: ignore[attr-defined]


def test_expired_url(server: StateServer, policy: OutboundPolicy, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    with pytest.raises(UrlExpiredError, match="download URL expired") as info:
        _download(server, policy, "/expired", dest)
    assert "SECRETSIG" not in str(info.value)
    assert info.value.code == "URL_EXPIRED"
    assert not dest.exists()


def test_forbidden_url(server: StateServer, policy: OutboundPolicy, tmp_path: Path) -> None:
    with pytest.raises(UrlForbiddenError, match="forbidden") as info:
        _download(server, policy, "/forbidden", tmp_path / "f")
    assert "SECRETSIG" not in str(info.value)
    # A permanent refusal is not retried.
    assert len([r for r in server.state.requests if r[1] == "/forbidden"]) == 1


def test_not_found(server: StateServer, policy: OutboundPolicy, tmp_path: Path) -> None:
    with pytest.raises(DownloadFailedError, match="not found") as info:
        _download(server, policy, "/missing", tmp_path / "f")
    assert info.value.code == "DOWNLOAD_FAILED"
    assert "SECRETSIG" not in str(info.value)


def test_server_errors_are_retried_per_part(server: StateServer, policy: OutboundPolicy, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    # Every distinct request (probe and each part) fails once with 500, then succeeds.
    result = _download(server, policy, "/flaky", dest, expected_crc32c_b64=crc32c_b64_of_bytes(DATA))
    assert dest.read_bytes() == DATA
    assert result.size_bytes == len(DATA)  # type: ignore[attr-defined]
    assert len(server.state.ranged_gets("/flaky")) == 12


def test_truncated_part_is_fetched_again(server: StateServer, policy: OutboundPolicy, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    result = _download(server, policy, "/truncated", dest)
    assert result.crc32c_b64 == crc32c_b64_of_bytes(DATA)  # type: ignore[attr-defined]
    assert dest.read_bytes() == DATA


def test_persistent_server_errors_become_retryable(server: StateServer, policy: OutboundPolicy, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    with pytest.raises(RetryableError, match="after 3 attempts") as info:
        _download(server, policy, "/throttled", dest, attempts=3)
    assert "SECRETSIG" not in str(info.value)
    assert len([r for r in server.state.requests if r[1] == "/throttled"]) == 3
    assert not dest.exists()


def test_size_change_between_parts(server: StateServer, policy: OutboundPolicy, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    with pytest.raises(DownloadFailedError, match="changed size"):
        _download(server, policy, "/grows", dest)
    assert not dest.exists()


def test_wrong_checksum(server: StateServer, policy: OutboundPolicy, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    actual = crc32c_b64_of_bytes(DATA)
    with pytest.raises(ChecksumMismatchError) as info:
        _download(server, policy, "/file", dest, expected_crc32c_b64="AAAAAA==")
    assert "expected AAAAAA==" in str(info.value)
    assert actual in str(info.value)
    assert not dest.exists()


def test_malformed_expected_checksum_is_a_user_error(
    server: StateServer, policy: OutboundPolicy, tmp_path: Path
) -> None:
    with pytest.raises(ChecksumMismatchError, match="not a base64 CRC-32C"):
        _download(server, policy, "/file", tmp_path / "f", expected_crc32c_b64="752f9554")
    assert server.state.requests == []


def test_redirect_within_allowlist_is_followed(server: StateServer, policy: OutboundPolicy, tmp_path: Path) -> None:
    result = _download(server, policy, "/redirect-same", tmp_path / "f")
    assert result.crc32c_b64 == crc32c_b64_of_bytes(DATA)  # type: ignore[attr-defined]
    # Parts go straight to the redirect target instead of bouncing once each.
    assert [p for _, p, _ in server.state.requests].count("/redirect-same") == 1


@pytest.fixture
def other_server() -> Iterator[StateServer]:
    srv = StateServer(ServerState(DATA))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("caller_client", [False, True])
def test_redirect_to_host_not_allowed_is_refused_without_connecting(
    server: StateServer,
    other_server: StateServer,
    policy: OutboundPolicy,
    tmp_path: Path,
    caller_client: bool,
) -> None:
    # Same machine, but named "localhost", which this allowlist (127.0.0.1 only) does not hold.
    server.state.redirect_target = f"http://localhost:{other_server.server_address[1]}/file?{SIGNATURE}"
    dest = tmp_path / "f"
    with httpx.Client() as plain:
        # A caller's plain client gets the same checks: redirects are followed by hand.
        client = plain if caller_client else None
        with pytest.raises(
            UrlNotAllowedError, match=r"redirect refused.*host localhost is not in the allowlist"
        ) as info:
            _download(server, policy, "/redirect-elsewhere", dest, client=client)
    assert "SECRETSIG" not in str(info.value)
    assert other_server.state.requests == []
    assert not dest.exists()


def test_url_refused_by_policy_before_any_request(server: StateServer, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    dest.write_bytes(b"keep me")
    https_only = OutboundPolicy({Purpose.DOWNLOAD: ["https://127.0.0.1"]})
    with pytest.raises(UrlNotAllowedError, match="scheme http is not allowed") as info:
        _download(server, https_only, "/file", dest)
    assert "SECRETSIG" not in str(info.value)
    assert server.state.requests == []
    assert dest.read_bytes() == b"keep me"


def test_connection_refused_becomes_retryable(policy: OutboundPolicy, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    with pytest.raises(RetryableError, match="ConnectError") as info:
        download(
            f"http://127.0.0.1:{port}/file?{SIGNATURE}",
            tmp_path / "f",
            policy=policy,
            expected_crc32c_b64=None,
            attempts=2,
            retry_backoff_s=0.01,
        )
    assert "SECRETSIG" not in str(info.value)


def test_logs_rate_without_query(
    server: StateServer, policy: OutboundPolicy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="batch_job.fetch"):
        _download(server, policy, "/flaky", tmp_path / "f")
    text = caplog.text
    assert "download done" in text
    assert "MB/s" in text
    assert f"{len(DATA)} of {len(DATA)} bytes" in text
    assert "retrying" in text  # the 500s were logged as retries
    assert "SECRETSIG" not in text
