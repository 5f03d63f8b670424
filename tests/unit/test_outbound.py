"""The outbound URL policy. No traffic leaves the machine: literal IPs, a fake resolver, loopback."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpcore
import httpx
import pytest

from slidebridge.errors import RetryableError, UrlNotAllowedError
from slidebridge.outbound import READ_SIZE, AllowEntry, OutboundPolicy, Purpose, _LargeReadStream, redact_url
from slidebridge.settings import Settings

SIG = "X-Amz-Signature=SECRETSIG0123"
S3 = "*.s3.us-west-2.amazonaws.com"
SECTRA_PREFIX = "/SectraPathologyServer/external/imageanalysis/v1"


def policy_for(*entries: str, purpose: Purpose = Purpose.DOWNLOAD, **kwargs: object) -> OutboundPolicy:
    return OutboundPolicy({purpose: list(entries)}, **kwargs)  # type: ignore[arg-type]


def refusal(policy: OutboundPolicy, url: str, purpose: Purpose = Purpose.DOWNLOAD) -> str:
    with pytest.raises(UrlNotAllowedError) as info:
        policy.check(url, purpose)
    message = str(info.value)
    # Presigned signatures and passwords never reach a message or a log.
    assert "SECRETSIG" not in message
    assert "hunter2" not in message
    assert info.value.code == "URL_NOT_ALLOWED"
    return message


# --- allowlist entries ---------------------------------------------------------------------------


def test_bare_host_allows_https_on_default_port_only() -> None:
    policy = policy_for("files.example.org")
    assert policy.check(f"https://files.example.org/a/b?{SIG}", Purpose.DOWNLOAD).endswith(f"/a/b?{SIG}")
    assert policy.check("https://files.example.org:443/a", Purpose.DOWNLOAD)
    assert "scheme http is not allowed" in refusal(policy, "http://files.example.org/a")
    assert "port 8443 is not allowed" in refusal(policy, "https://files.example.org:8443/a")


def test_host_port_entry_allows_only_that_port() -> None:
    policy = policy_for("files.example.org:8443")
    assert policy.check("https://files.example.org:8443/a", Purpose.DOWNLOAD)
    assert "port 443 is not allowed" in refusal(policy, "https://files.example.org/a")


def test_http_entry_allows_plain_http_for_that_host() -> None:
    policy = policy_for("http://pacs.hospital.example", "other.example")
    assert policy.check("http://pacs.hospital.example/x", Purpose.DOWNLOAD)
    assert policy.check("https://pacs.hospital.example/x", Purpose.DOWNLOAD)
    assert "port 8080 is not allowed" in refusal(policy, "http://pacs.hospital.example:8080/x")
    assert "scheme http is not allowed" in refusal(policy, "http://other.example/x")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.8.7", "localhost", "[::1]"])
def test_loopback_entry_allows_http_on_any_port(host: str) -> None:
    policy = policy_for(host)
    assert policy.check(f"http://{host}:54321/x?{SIG}", Purpose.DOWNLOAD)
    assert policy.check(f"https://{host}:443/x", Purpose.DOWNLOAD)


def test_loopback_entry_with_port_or_https_scheme_narrows_it() -> None:
    assert "port 1234 is not allowed" in refusal(policy_for("127.0.0.1:9000"), "http://127.0.0.1:1234/")
    assert "scheme http is not allowed" in refusal(policy_for("https://localhost"), "http://localhost:1234/")


def test_wildcard_matches_subdomains_not_the_apex() -> None:
    policy = policy_for(S3)
    assert policy.check(f"https://my-bucket.s3.us-west-2.amazonaws.com/key.8061860?{SIG}", Purpose.DOWNLOAD)
    assert "not in the allowlist" in refusal(policy, "https://s3.us-west-2.amazonaws.com/bucket/key")
    assert "not in the allowlist" in refusal(policy, "https://bucket.s3.us-east-1.amazonaws.com/key")
    assert "not in the allowlist" in refusal(policy, "https://evil-s3.us-west-2.amazonaws.com/key")
    assert "scheme http is not allowed" in refusal(policy, "http://b.s3.us-west-2.amazonaws.com/key")


def test_host_matching_ignores_case_and_trailing_dot() -> None:
    policy = policy_for("Files.Example.ORG")
    assert policy.check("https://FILES.example.org./x", Purpose.DOWNLOAD)


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("ftp://files.example.org", "scheme"),
        ("*.com", "wildcard"),
        ("*", "wildcard|host"),
        ("user@files.example.org", "host"),
        ("2130706433", "numeric"),
        ("files.example.org:99999", "port|Invalid"),
    ],
)
def test_bad_entries_fail_at_start_up(entry: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        AllowEntry.parse(entry)


# --- URL refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("gopher://127.0.0.1/", "scheme 'gopher' is not allowed"),
        (f"http://admin:hunter2@127.0.0.1/?{SIG}", "userinfo"),
        ("http://127.0.0.1\\@evil.example/", "userinfo"),
        (f"https://evil.example/?{SIG}", "host evil.example is not in the allowlist for download"),
        ("http://2130706433/", "numeric host"),
        ("http://0x7f.1/", "numeric host"),
        ("http://127.1/", "numeric host"),
        ("not a url", "scheme"),
    ],
)
def test_refusals_name_the_rule(url: str, rule: str) -> None:
    assert rule in refusal(policy_for("127.0.0.1", "files.example.org"), url)


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "169.254.170.2",  # ECS task metadata
        "[fd00:ec2::254]",
        "100.100.100.200",
        "[fe80::1]",
        "[::ffff:169.254.169.254]",
        "[64:ff9b::a9fe:a9fe]",  # NAT64 form of 169.254.169.254
        "[64:ff9b:1::a9fe:a9fe]",  # the same behind a local-use NAT64 prefix (RFC 8215)
        "[::ffff:0:a9fe:a9fe]",  # IPv4-translated (SIIT)
        "[::a9fe:a9fe]",  # IPv4-compatible (deprecated, still parsed)
        "0.0.0.0",
    ],
)
def test_metadata_and_link_local_always_refused_even_if_allowlisted(address: str) -> None:
    policy = policy_for(f"http://{address}")
    message = refusal(policy, f"http://{address}/latest/meta-data/?{SIG}")
    assert "link-local/metadata and always refused" in message


def test_purposes_are_separate() -> None:
    policy = OutboundPolicy(
        {Purpose.DOWNLOAD: [S3], Purpose.SECTRA_CALLBACK: ["pacs.hospital.example"]},
    )
    assert policy.check("https://pacs.hospital.example/x", Purpose.SECTRA_CALLBACK)
    assert "not in the allowlist for download" in refusal(policy, "https://pacs.hospital.example/x")
    assert "allowlist for techcyte_api is empty" in refusal(
        policy, "https://api.app.techcyte.com/api/v3", Purpose.TECHCYTE_API
    )


def test_path_prefix_entry() -> None:
    policy = policy_for(f"http://pacs.hospital.example{SECTRA_PREFIX}", purpose=Purpose.SECTRA_CALLBACK)
    base = f"http://pacs.hospital.example{SECTRA_PREFIX}"
    assert policy.check(base, Purpose.SECTRA_CALLBACK)
    assert policy.check(base + "/applications/a/results", Purpose.SECTRA_CALLBACK)
    for bad in (
        "http://pacs.hospital.example/SectraPathologyServer/admin",
        base + "x/results",
        base + "/%2e%2e/%2E%2E/admin",
    ):
        assert "outside the allowed prefix" in refusal(policy, bad, Purpose.SECTRA_CALLBACK)


def test_check_returns_normalised_url_with_query_and_without_fragment() -> None:
    policy = policy_for(S3)
    url = policy.check(f"HTTPS://Bucket.S3.us-west-2.amazonaws.com/k?{SIG}#frag", Purpose.DOWNLOAD)
    assert url == f"https://bucket.s3.us-west-2.amazonaws.com/k?{SIG}"


def test_redact_url_drops_query_and_userinfo() -> None:
    assert redact_url(f"https://u:hunter2@h.example/a/b?{SIG}#f") == "https://h.example:443/a/b"


def test_from_settings() -> None:
    settings = Settings(
        download_hosts=f" {S3}, 127.0.0.1 ,",
        sectra_callback_hosts="http://pacs.hospital.example:8080",
        techcyte_api_url="https://api.ci.techcyte.com/api/v3",
    )
    policy = OutboundPolicy.from_settings(settings)
    assert policy.check("https://b.s3.us-west-2.amazonaws.com/k", Purpose.DOWNLOAD)
    assert policy.check("http://127.0.0.1:5000/k", Purpose.DOWNLOAD)
    assert policy.check("http://pacs.hospital.example:8080/x", Purpose.SECTRA_CALLBACK)
    assert policy.check("https://api.ci.techcyte.com/api/v3/token", Purpose.TECHCYTE_API)
    assert "not in the allowlist" in refusal(policy, "https://api.app.techcyte.com/api/v3", Purpose.TECHCYTE_API)
    assert "scheme http" in refusal(policy, "http://api.ci.techcyte.com/api/v3", Purpose.TECHCYTE_API)


def test_from_settings_local_techcyte_over_http() -> None:
    policy = OutboundPolicy.from_settings(Settings(techcyte_api_url="http://127.0.0.1:8123/api/v3"))
    assert policy.check("http://127.0.0.1:8123/api/v3/token", Purpose.TECHCYTE_API)
    assert "port 8124" in refusal(policy, "http://127.0.0.1:8124/api/v3/token", Purpose.TECHCYTE_API)


# --- resolution (fake resolver: no DNS traffic) -------------------------------------------------


class FakeResolver:
    def __init__(self, answers: dict[str, Sequence[str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]


def test_resolve_and_check_returns_public_addresses() -> None:
    resolver = FakeResolver({"b.s3.us-west-2.amazonaws.com": ["52.92.1.1", "2600:1fa0::1"]})
    policy = policy_for(S3, resolver=resolver)
    addresses = policy.resolve_and_check(f"https://b.s3.us-west-2.amazonaws.com/k?{SIG}", Purpose.DOWNLOAD)
    assert [str(a) for a in addresses] == ["52.92.1.1", "2600:1fa0::1"]
    assert resolver.calls == [("b.s3.us-west-2.amazonaws.com", 443)]


@pytest.mark.parametrize(
    ("answers", "rule"),
    [
        (["169.254.169.254"], "link-local/metadata"),
        (["52.92.1.1", "fd00:ec2::254"], "link-local/metadata"),  # one bad answer is enough
        (["10.0.0.7"], "DNS-rebinding"),
        (["127.0.0.1"], "DNS-rebinding"),
        (["192.168.1.1"], "DNS-rebinding"),
    ],
)
def test_resolved_addresses_are_checked(answers: list[str], rule: str) -> None:
    policy = policy_for(S3, resolver=FakeResolver({"b.s3.us-west-2.amazonaws.com": answers}))
    with pytest.raises(UrlNotAllowedError, match=rule) as info:
        policy.resolve_and_check(f"https://b.s3.us-west-2.amazonaws.com/k?{SIG}", Purpose.DOWNLOAD)
    assert "SECRETSIG" not in str(info.value)


def test_trusted_networks_admit_private_answers() -> None:
    resolver = FakeResolver({"pacs.hospital.example": ["10.20.0.5"]})
    policy = policy_for("pacs.hospital.example", resolver=resolver, trusted_networks=["10.20.0.0/16"])
    assert [str(a) for a in policy.resolve_and_check("https://pacs.hospital.example/", Purpose.DOWNLOAD)] == [
        "10.20.0.5"
    ]
    resolver.answers["pacs.hospital.example"] = ["10.99.0.5"]
    with pytest.raises(UrlNotAllowedError, match="DNS-rebinding"):
        policy.resolve_and_check("https://pacs.hospital.example/", Purpose.DOWNLOAD)


def test_localhost_entry_may_resolve_to_loopback_only() -> None:
    resolver = FakeResolver({"localhost": ["127.0.0.1", "::1"]})
    policy = policy_for("localhost", resolver=resolver)
    assert len(policy.resolve_and_check("http://localhost:8000/", Purpose.DOWNLOAD)) == 2
    resolver.answers["localhost"] = ["10.0.0.1"]
    with pytest.raises(UrlNotAllowedError, match="DNS-rebinding"):
        policy.resolve_and_check("http://localhost:8000/", Purpose.DOWNLOAD)


def test_private_literal_entry_needs_no_resolution() -> None:
    resolver = FakeResolver({})
    policy = policy_for("http://10.1.2.3:9000", resolver=resolver)
    assert [str(a) for a in policy.resolve_and_check("http://10.1.2.3:9000/b/k", Purpose.DOWNLOAD)] == ["10.1.2.3"]
    assert resolver.calls == []


def test_unresolvable_host_is_retryable() -> None:
    policy = policy_for("files.example.org", resolver=FakeResolver({}))
    with pytest.raises(RetryableError, match="cannot resolve"):
        policy.resolve_and_check("https://files.example.org/x", Purpose.DOWNLOAD)


def test_default_resolver_uses_getaddrinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        assert (host, port) == ("files.example.org", 443)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(UrlNotAllowedError, match="link-local/metadata"):
        policy_for("files.example.org").resolve_and_check("https://files.example.org/x", Purpose.DOWNLOAD)


# --- httpx integration against a loopback server -------------------------------------------------


def _big_body(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EchoServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        with self.server.lock:
            self.server.seen.append((parts.path, dict(self.headers.items())))
        if parts.path == "/redirect":
            self._send(302, b"", {"Location": parse_qs(parts.query)["to"][0]})
        elif parts.path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif parts.path == "/big":
            self._send(200, _big_body(int(parse_qs(parts.query)["bytes"][0])), {})
        else:
            body = json.dumps({"host": self.headers.get("Host"), "auth": self.headers.get("Authorization")})
            self._send(200, body.encode(), {"Content-Type": "application/json"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.lock = threading.Lock()
        self.seen: list[tuple[str, dict[str, str]]] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])


def _serve() -> Iterator[EchoServer]:
    srv = EchoServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    yield from _serve()


@pytest.fixture
def echo2() -> Iterator[EchoServer]:
    yield from _serve()


def test_client_connects_to_the_checked_address(echo: EchoServer) -> None:
    # A made-up name that the policy's resolver maps to our loopback server: proves the connection
    # goes to the address the policy checked, not to a second lookup, while Host keeps the name.
    resolver = FakeResolver({"files.internal.example": ["127.0.0.1"]})
    entry = f"http://files.internal.example:{echo.port}"
    trusted = policy_for(entry, resolver=resolver, trusted_networks=["127.0.0.0/8"])
    with trusted.client(Purpose.DOWNLOAD) as client:
        response = client.get(f"http://files.internal.example:{echo.port}/x?{SIG}")
    assert response.json()["host"] == f"files.internal.example:{echo.port}"

    untrusted = policy_for(entry, resolver=resolver)
    with untrusted.client(Purpose.DOWNLOAD) as client, pytest.raises(UrlNotAllowedError, match="DNS-rebinding"):
        client.get(f"http://files.internal.example:{echo.port}/x")
    assert len(echo.seen) == 1


def test_client_refuses_metadata_answer_without_connecting(echo: EchoServer) -> None:
    resolver = FakeResolver({"files.internal.example": ["169.254.169.254"]})
    policy = policy_for(f"http://files.internal.example:{echo.port}", resolver=resolver)
    with policy.client(Purpose.DOWNLOAD) as client, pytest.raises(UrlNotAllowedError, match="metadata"):
        client.get(f"http://files.internal.example:{echo.port}/x")


def test_client_rechecks_every_redirect(echo: EchoServer, echo2: EchoServer) -> None:
    policy = policy_for("127.0.0.1")
    target = f"http://localhost:{echo2.port}/secret"
    with policy.client(Purpose.DOWNLOAD) as client, pytest.raises(UrlNotAllowedError, match="host localhost"):
        client.get(f"http://127.0.0.1:{echo.port}/redirect", params={"to": target})
    assert echo2.seen == []
    # An allowed target is followed.
    ok = f"http://127.0.0.1:{echo2.port}/fine"
    with policy.client(Purpose.DOWNLOAD) as client:
        assert client.get(f"http://127.0.0.1:{echo.port}/redirect", params={"to": ok}).status_code == 200
    assert [path for path, _ in echo2.seen] == ["/fine"]


def test_sectra_callback_client_does_not_follow_redirects(echo: EchoServer) -> None:
    policy = policy_for("127.0.0.1", purpose=Purpose.SECTRA_CALLBACK)
    with policy.client(Purpose.SECTRA_CALLBACK) as client:
        response = client.get(f"http://127.0.0.1:{echo.port}/loop")
    assert response.status_code == 302
    assert [path for path, _ in echo.seen] == ["/loop"]


def test_request_hook_checks_redirects_of_any_client(echo: EchoServer, echo2: EchoServer) -> None:
    policy = policy_for("127.0.0.1")
    hooks = {"request": [policy.request_hook(Purpose.DOWNLOAD)]}
    with httpx.Client(event_hooks=hooks, follow_redirects=True) as client:
        with pytest.raises(UrlNotAllowedError, match="host localhost"):
            client.get(f"http://127.0.0.1:{echo.port}/redirect", params={"to": f"http://localhost:{echo2.port}/"})
        with pytest.raises(UrlNotAllowedError, match="host localhost"):
            client.get(f"http://localhost:{echo2.port}/")
    assert echo2.seen == []


def test_manual_redirects_strip_credentials_across_origins(echo: EchoServer, echo2: EchoServer) -> None:
    policy = policy_for("127.0.0.1")
    with httpx.Client() as client:
        request = client.build_request(
            "GET",
            f"http://127.0.0.1:{echo.port}/redirect",
            params={"to": f"http://127.0.0.1:{echo2.port}/landing"},
            headers={"Authorization": "Bearer t0k"},
        )
        response = policy.send_following_redirects(client, request, Purpose.DOWNLOAD)
        response.read()
        response.close()
    assert response.json()["auth"] is None
    assert echo.seen[0][1]["Authorization"] == "Bearer t0k"


def test_manual_redirects_are_limited(echo: EchoServer) -> None:
    policy = policy_for("127.0.0.1", purpose=Purpose.SECTRA_CALLBACK)
    with httpx.Client() as client:
        request = client.build_request("GET", f"http://127.0.0.1:{echo.port}/loop")
        with pytest.raises(UrlNotAllowedError, match="redirects are refused"):
            policy.send_following_redirects(client, request, Purpose.SECTRA_CALLBACK)
        with pytest.raises(UrlNotAllowedError, match="more than 5 redirects"):
            policy.send_following_redirects(client, request, Purpose.SECTRA_CALLBACK, max_hops=5)
    assert len(echo.seen) == 1 + 6


class _RecordingStream(httpcore.NetworkStream):
    """An in-memory network stream that records how many bytes each read asked for."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self.asked.append(max_bytes)
        return b"x"

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return self.tls

    @cached_property
    def tls(self) -> _RecordingStream:
        return _RecordingStream()


def test_guarded_connections_read_the_socket_in_large_pieces() -> None:
    # httpcore asks for 64 KiB per read; a 2 GB slide would take 32,000 trips through h11, httpx and
    # the fetcher's pwrite + CRC loop per GB. Reads ask for READ_SIZE, before and after TLS.
    inner = _RecordingStream()
    stream = _LargeReadStream(inner)
    stream.read(64 * 1024)
    stream.read(4 * READ_SIZE)
    assert inner.asked == [READ_SIZE, 4 * READ_SIZE]
    tls = stream.start_tls(ssl.create_default_context(), server_hostname="files.example")
    tls.read(64 * 1024)
    assert inner.tls.asked == [READ_SIZE]
    assert READ_SIZE >= 256 * 1024


def test_guarded_client_streams_a_body_larger_than_a_read(echo: EchoServer) -> None:
    policy = policy_for("127.0.0.1")
    with policy.client(Purpose.DOWNLOAD) as client:
        response = client.get(f"http://127.0.0.1:{echo.port}/big", params={"bytes": str(3 * READ_SIZE + 17)})
    assert response.status_code == 200
    assert response.content == _big_body(3 * READ_SIZE + 17)
