"""Outbound URL policy: the SSRF guard for every URL we call or fetch (DESIGN §6, §7).

Every outbound URL (slide downloads, Sectra callbacks, the Techcyte API) comes from a request body,
so an attacker who can reach a webhook picks where we connect and where bearer tokens go. Each URL
is checked against the allowlist of its :class:`Purpose` before any connection, and again for
every redirect hop and at connect time against the addresses the host actually resolved to.

Allowlist entries (``SLIDEBRIDGE_DOWNLOAD_HOSTS``, ``SLIDEBRIDGE_SECTRA_CALLBACK_HOSTS``; comma-separated):

``host``
    https on the scheme's default port (443). For loopback hosts (``localhost``, 127.0.0.0/8,
    ``::1``) http is allowed too, on **any** port: the local stack and tests use random ports.
``host:port``
    as above, but only that port (loopback included).
``http://host[:port]``
    plain http as well as https for that host. Without a port: the default port of the scheme in
    the URL (80 for http, 443 for https); loopback hosts any port.
``https://host[:port]``
    https only, even for loopback hosts.
``*.example.com``
    wildcard suffix: any host *below* ``example.com`` (not ``example.com`` itself), e.g.
    ``*.s3.us-west-2.amazonaws.com`` for presigned S3 URLs with bucket sub-domains. It needs at
    least two labels after ``*.`` (``*.com`` is refused as too broad). Scheme and port rules as for
    a bare ``host``.
``...[/path/prefix]``
    any of the above followed by a path: the URL path must equal it or continue below it
    (segment-wise), e.g. Sectra's ``/SectraPathologyServer/external/imageanalysis/v1`` (SECTRA §13).

Address rules, whatever the allowlist says:

- link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254,
  100.100.100.200, 168.63.129.16, 192.0.0.192), unspecified (0.0.0.0/8, ``::``), multicast and
  broadcast are always refused, also when written as IPv4-mapped / NAT64 / 6to4 IPv6;
- a host *name* must resolve to global addresses only (DNS-rebinding guard). Exceptions: a
  ``localhost`` entry may resolve to loopback; addresses in ``trusted_networks`` (constructor
  argument, e.g. an on-premises PACS network or an S3 VPC endpoint) are accepted for any name.
  An IP *literal* in the allowlist (``10.0.0.5``, ``127.0.0.1``) is accepted as written.

Error messages and logs show URLs as ``scheme://host:port/path`` only: query strings carry presigned
signatures and userinfo carries passwords.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httpcore
import httpx

from slidebridge.errors import RetryableError, UrlNotAllowedError

if TYPE_CHECKING:
    import ssl

    from slidebridge.settings import Settings

__all__ = [
    "DEFAULT_MAX_REDIRECTS",
    "AllowEntry",
    "CheckedUrl",
    "GuardedTransport",
    "IPAddress",
    "OutboundPolicy",
    "Purpose",
    "Resolver",
    "redact_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# httpx logs every request's full URL at INFO, presigned query (a bearer credential) included, and
# httpcore logs headers at DEBUG. Every outbound client is built here, so this is where they are
# quietened: our own logs name URLs through ``redact_url``.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# (host, port) → the addresses a connection would try, as text.
Resolver = Callable[[str, int], Sequence[str]]

DEFAULT_MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Purpose(StrEnum):
    DOWNLOAD = "download"
    SECTRA_CALLBACK = "sectra_callback"
    TECHCYTE_API = "techcyte_api"


# Redirect hops each purpose may follow. Sectra callbacks carry a bearer token and PHI, and SECTRA §13
# says to refuse redirects outright; presigned S3 GETs may see a 307 to the bucket's region.
_MAX_REDIRECTS: dict[Purpose, int] = {
    Purpose.DOWNLOAD: DEFAULT_MAX_REDIRECTS,
    Purpose.SECTRA_CALLBACK: 0,
    Purpose.TECHCYTE_API: DEFAULT_MAX_REDIRECTS,
}

# --- address classification ----------------------------------------------------------------------

_ALWAYS_REFUSED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # IPv4 link-local; AWS/GCP/Azure/OpenStack metadata at 169.254.169.254
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS IMDS over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "168.63.129.16/32",  # Azure WireServer
        "192.0.0.192/32",  # Oracle Cloud metadata
        "0.0.0.0/8",  # "this network": connecting to 0.0.0.0 reaches the local host on Linux
        "::/128",
        "255.255.255.255/32",
    )
)


# IPv6 ranges whose last 32 bits are an IPv4 address: NAT64 (RFC 6052 well-known prefix, and the
# /96 form of RFC 8215's local-use prefix), SIIT's IPv4-translated form (RFC 2765) and the deprecated
# IPv4-compatible form (RFC 4291; "::" and "::1" excepted, they are IPv6's own).
_IPV4_IN_LAST_32_BITS = tuple(
    ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96", "::/96")
)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address tunnels to (mapped, translated, NAT64, 6to4, Teredo), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if int(ip) > 1 and any(ip in net for net in _IPV4_IN_LAST_32_BITS):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def _forms(ip: IPAddress) -> list[IPAddress]:
    forms: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and (v4 := _embedded_ipv4(ip)) is not None:
        forms.append(v4)
    return forms


def _always_refused(ip: IPAddress) -> bool:
    return any(
        form.is_link_local
        or form.is_multicast
        or form.is_unspecified
        or any(form in net for net in _ALWAYS_REFUSED_NETWORKS)
        for form in _forms(ip)
    )


def _is_loopback(ip: IPAddress) -> bool:
    return any(form.is_loopback for form in _forms(ip))


def _is_global(ip: IPAddress) -> bool:
    return all(form.is_global for form in _forms(ip))


# --- URLs ----------------------------------------------------------------------------------------


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def redact_url(url: str | httpx.URL) -> str:
    """``scheme://host:port/path`` of ``url``: no userinfo, query or fragment (safe for logs)."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<malformed URL>"
    scheme = parsed.scheme or "?"
    host = parsed.raw_host.decode("ascii", "replace") or "?"
    port = parsed.port or _DEFAULT_PORTS.get(scheme)
    port_part = f":{port}" if port is not None else ""
    return f"{scheme}://{_format_host(host)}{port_part}{parsed.path}"


_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def _canonical_host(raw: str) -> str:
    """Lower-case host without a trailing dot (DNS treats ``a.b.`` and ``a.b`` alike)."""
    return raw.lower().rstrip(".")


def _ends_in_number(host: str) -> bool:
    # WHATWG URL rule: a host whose last label is numeric is an IPv4 address in some notation
    # (2130706433, 0x7f.1, 127.1 all reach 127.0.0.1 through inet_aton). Only dotted-quad decimal
    # is unambiguous, so anything else is refused rather than matched by name.
    return bool(_NUMERIC_LABEL.match(host.rsplit(".", 1)[-1]))


def _path_within(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _has_dot_segments(raw_path: str) -> bool:
    # httpx resolves literal "." and ".." segments, but "%2e%2e" survives and a server that
    # decodes before normalising would walk out of an allowed path prefix.
    return any(unquote(segment) in {".", ".."} for segment in raw_path.split("/"))


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """One parsed allowlist entry (see the module docstring for the grammar)."""

    raw: str
    host: str  # canonical host; for a wildcard the suffix after "*."
    wildcard: bool
    schemes: frozenset[str]
    port: int | None
    path_prefix: str
    ip: IPAddress | None  # set when the entry is an IP literal

    @property
    def is_loopback(self) -> bool:
        return self.host == "localhost" if self.ip is None else _is_loopback(self.ip)

    @property
    def any_port(self) -> bool:
        return self.port is None and self.is_loopback

    def matches_host(self, host: str) -> bool:
        if self.wildcard:
            return host.endswith("." + self.host)
        if self.ip is not None:
            literal = _ip_literal(host)
            return literal is not None and literal == self.ip
        return host == self.host

    def allowed_ports(self, scheme: str) -> str:
        if self.any_port:
            return "any"
        return str(self.port if self.port is not None else _DEFAULT_PORTS[scheme])

    def port_ok(self, scheme: str, port: int) -> bool:
        if self.any_port:
            return True
        return port == (self.port if self.port is not None else _DEFAULT_PORTS[scheme])

    @classmethod
    def parse(cls, raw: str) -> AllowEntry:
        """Parse one entry; ``ValueError`` names what is wrong (a configuration error)."""
        text = raw.strip()
        explicit_scheme: str | None = None
        if "://" in text:
            explicit_scheme, text = text.split("://", 1)
            explicit_scheme = explicit_scheme.lower()
            if explicit_scheme not in _DEFAULT_PORTS:
                raise ValueError(f"allowlist entry {raw!r}: scheme must be http or https")
        hostport, slash, path = text.partition("/")
        path_prefix = (slash + path).rstrip("/")
        wildcard = hostport.startswith("*.")
        if wildcard:
            hostport = hostport[2:]
        try:
            # httpx's parser (the one requests go through) validates the host and port and
            # IDNA-encodes names, so entries and URLs are canonicalised the same way.
            parsed = httpx.URL(f"https://{hostport}/")
        except httpx.InvalidURL as exc:
            raise ValueError(f"allowlist entry {raw!r}: {exc}") from exc
        if parsed.userinfo or not parsed.raw_host:
            raise ValueError(f"allowlist entry {raw!r}: expected host[:port]")
        host = _canonical_host(parsed.raw_host.decode("ascii"))
        ip = _ip_literal(host)
        if wildcard and (ip is not None or host.count(".") < 1):
            raise ValueError(f"allowlist entry {raw!r}: a wildcard needs a domain of two labels or more")
        if ip is None and not _HOST_NAME.match(host):
            raise ValueError(f"allowlist entry {raw!r}: {host!r} is not a host name")
        if ip is None and _ends_in_number(host):
            raise ValueError(f"allowlist entry {raw!r}: numeric host that is not a dotted-quad IPv4")
        port = parsed.port
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"allowlist entry {raw!r}: port out of range")
        loopback = host == "localhost" if ip is None else _is_loopback(ip)
        if explicit_scheme == "https":
            schemes = frozenset({"https"})
        elif explicit_scheme == "http" or (loopback and not wildcard):
            schemes = frozenset({"http", "https"})
        else:
            schemes = frozenset({"https"})
        return cls(
            raw=raw.strip(),
            host=host,
            wildcard=wildcard,
            schemes=schemes,
            port=port,
            path_prefix=path_prefix,
            ip=ip,
        )


@dataclass(frozen=True, slots=True)
class CheckedUrl:
    """A URL that passed :meth:`OutboundPolicy.check_url`, with the entry that allowed it."""

    url: str  # normalised (what httpx will send), query included: never log it
    scheme: str
    host: str  # canonical: lower case, IDNA, no trailing dot, IPv6 without brackets
    port: int
    path: str
    entry: AllowEntry

    @property
    def redacted(self) -> str:
        return f"{self.scheme}://{_format_host(self.host)}:{self.port}{self.path}"


def _default_resolver(host: str, port: int) -> list[str]:
    # Looked up at call time so tests can monkeypatch socket.getaddrinfo.
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class OutboundPolicy:
    """Allowlists per :class:`Purpose`, and the checks every outbound request goes through."""

    def __init__(
        self,
        allowlists: Mapping[Purpose, Sequence[str]],
        *,
        trusted_networks: Sequence[str] = (),
        resolver: Resolver | None = None,
    ) -> None:
        self._entries: dict[Purpose, tuple[AllowEntry, ...]] = {
            purpose: tuple(AllowEntry.parse(raw) for raw in allowlists.get(purpose, ()) if raw.strip())
            for purpose in Purpose
        }
        self._trusted = tuple(ipaddress.ip_network(n, strict=False) for n in trusted_networks)
        self._resolver: Resolver = resolver or _default_resolver

    @classmethod
    def from_settings(cls, settings: Settings, *, trusted_networks: Sequence[str] = ()) -> OutboundPolicy:
        techcyte = httpx.URL(settings.techcyte_api_url)
        techcyte_entry = _format_host(techcyte.raw_host.decode("ascii"))
        if techcyte.port is not None:
            techcyte_entry += f":{techcyte.port}"
        if techcyte.scheme == "http":
            techcyte_entry = "http://" + techcyte_entry
        return cls(
            {
                Purpose.DOWNLOAD: settings.allowlist(settings.download_hosts),
                Purpose.SECTRA_CALLBACK: settings.allowlist(settings.sectra_callback_hosts),
                Purpose.TECHCYTE_API: [techcyte_entry],
            },
            trusted_networks=(*settings.allowlist(settings.outbound_trusted_networks), *trusted_networks),
        )

    def entries(self, purpose: Purpose) -> tuple[AllowEntry, ...]:
        return self._entries[purpose]

    @staticmethod
    def max_redirects(purpose: Purpose) -> int:
        return _MAX_REDIRECTS[purpose]

    # --- URL checks --------------------------------------------------------------------------

    def check(self, url: str, purpose: Purpose) -> str:
        """The normalised URL, or ``UrlNotAllowedError`` saying which rule refused it."""
        return self.check_url(url, purpose).url

    def check_url(self, url: str | httpx.URL, purpose: Purpose) -> CheckedUrl:
        redacted = redact_url(url)

        def refuse(reason: str) -> UrlNotAllowedError:
            return UrlNotAllowedError(f"URL not allowed for {purpose}: {reason} ({redacted})")

        try:
            parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise refuse("malformed URL") from exc
        scheme = parsed.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise refuse(f"scheme {scheme or '(none)'!r} is not allowed, only http/https")
        if parsed.userinfo:
            raise refuse("userinfo (user:password@) in the URL is not allowed")
        host = _canonical_host(parsed.raw_host.decode("ascii"))
        if not host:
            raise refuse("no host")
        literal = _ip_literal(host)
        if literal is None and _ends_in_number(host):
            raise refuse(f"numeric host {host} is not a dotted-quad IPv4 address")
        if literal is not None and _always_refused(literal):
            raise refuse(f"address {literal} is link-local/metadata and always refused")
        port = parsed.port if parsed.port is not None else _DEFAULT_PORTS[scheme]
        if not 0 < port < 65536:
            raise refuse(f"port {port} is out of range")

        entries = self._entries[purpose]
        if not entries:
            raise refuse(f"the allowlist for {purpose} is empty")
        candidates = [e for e in entries if e.matches_host(host)]
        if not candidates:
            raise refuse(f"host {host} is not in the allowlist for {purpose}")
        with_scheme = [e for e in candidates if scheme in e.schemes]
        if not with_scheme:
            allowed = " or ".join(sorted({s for e in candidates for s in e.schemes}))
            raise refuse(f"scheme {scheme} is not allowed for host {host} (allowed: {allowed})")
        with_port = [e for e in with_scheme if e.port_ok(scheme, port)]
        if not with_port:
            allowed = ", ".join(sorted({e.allowed_ports(scheme) for e in with_scheme}))
            raise refuse(f"port {port} is not allowed for {scheme}://{host} (allowed: {allowed})")
        # Prefixes are compared on the raw (still percent-encoded) path, so "%2F" cannot pose as "/".
        raw_path = parsed.raw_path.split(b"?", 1)[0].decode("ascii")
        with_path = [
            e
            for e in with_port
            if not e.path_prefix or (_path_within(raw_path, e.path_prefix) and not _has_dot_segments(raw_path))
        ]
        if not with_path:
            prefixes = ", ".join(sorted({e.path_prefix for e in with_port}))
            raise refuse(f"path is outside the allowed prefix ({prefixes})")
        normalised = str(parsed.copy_with(fragment=None)) if parsed.fragment else str(parsed)
        return CheckedUrl(url=normalised, scheme=scheme, host=host, port=port, path=parsed.path, entry=with_path[0])

    # --- address checks ----------------------------------------------------------------------

    def check_address(self, ip: IPAddress | str, *, host: str, purpose: Purpose) -> IPAddress:
        """Refuse an address ``host`` resolved to (or is), with the rule that failed."""
        addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        host = _canonical_host(host)
        where = f"host {host} (port/path not shown)"

        def refuse(reason: str) -> UrlNotAllowedError:
            return UrlNotAllowedError(f"URL not allowed for {purpose}: {reason} ({where})")

        if _always_refused(addr):
            raise refuse(f"address {addr} is link-local/metadata and always refused")
        entries = [e for e in self._entries[purpose] if e.matches_host(host)]
        if not entries:
            raise refuse(f"host {host} is not in the allowlist for {purpose}")
        if any(e.ip is not None for e in entries):
            # An IP literal allowlisted as written (private or loopback included).
            return addr
        if _is_global(addr) or any(addr in net for net in self._trusted):
            return addr
        if _is_loopback(addr) and any(e.is_loopback for e in entries):
            return addr
        raise refuse(
            f"{host} resolves to non-public address {addr}, and its allowlist entry is not a "
            "private/loopback literal (DNS-rebinding guard)"
        )

    def resolve_host(self, host: str, port: int, purpose: Purpose) -> list[IPAddress]:
        """Resolve ``host`` and check every address; refuses if any one is refused."""
        host = _canonical_host(host)
        literal = _ip_literal(host)
        if literal is not None:
            return [self.check_address(literal, host=host, purpose=purpose)]
        try:
            resolved = self._resolver(host, port)
        except OSError as exc:
            # An allowlisted host that does not resolve is a DNS or configuration fault, not the
            # caller's: retry later.
            raise RetryableError(f"cannot resolve allowlisted host {host} for {purpose}: {exc}") from exc
        if not resolved:
            raise RetryableError(f"allowlisted host {host} for {purpose} resolved to no address")
        unique: dict[IPAddress, None] = {}
        for text in resolved:
            # getaddrinfo returns scoped IPv6 as "fe80::1%eth0"; the scope does not change the class.
            unique[ipaddress.ip_address(text.split("%", 1)[0])] = None
        return [self.check_address(addr, host=host, purpose=purpose) for addr in unique]

    def resolve_and_check(self, url: str, purpose: Purpose) -> list[IPAddress]:
        """:meth:`check` plus DNS: the addresses a connection to ``url`` may use."""
        checked = self.check_url(url, purpose)
        return self.resolve_host(checked.host, checked.port, purpose)

    # --- httpx integration -------------------------------------------------------------------

    def request_hook(self, purpose: Purpose) -> Callable[[httpx.Request], None]:
        """An httpx ``event_hooks["request"]`` hook: httpx calls it for every redirect hop too.

        Name-level check only; prefer :meth:`client` / :meth:`transport`, which also pin the
        connection to checked addresses.
        """

        def hook(request: httpx.Request) -> None:
            self.check_url(request.url, purpose)

        return hook

    def transport(
        self,
        purpose: Purpose,
        *,
        verify: ssl.SSLContext | str | bool = True,
        limits: httpx.Limits | None = None,
    ) -> GuardedTransport:
        return GuardedTransport(self, purpose, verify=verify, limits=limits)

    def client(
        self,
        purpose: Purpose,
        *,
        verify: ssl.SSLContext | str | bool = True,
        limits: httpx.Limits | None = None,
        **kwargs: Any,
    ) -> httpx.Client:
        """An ``httpx.Client`` whose every request and redirect hop goes through this policy.

        Redirects are followed up to the purpose's limit (none for Sectra callbacks); environment
        proxies are ignored because an explicit transport replaces them.
        """
        hops = self.max_redirects(purpose)
        return httpx.Client(
            transport=self.transport(purpose, verify=verify, limits=limits),
            follow_redirects=hops > 0,
            max_redirects=hops,
            trust_env=False,
            **kwargs,
        )

    def send_following_redirects(
        self,
        client: httpx.Client,
        request: httpx.Request,
        purpose: Purpose,
        *,
        max_hops: int | None = None,
    ) -> httpx.Response:
        """Send with ``stream=True``, following redirects by hand, each hop checked first.

        For clients this policy did not build. The caller must close the returned response.
        """
        hops = self.max_redirects(purpose) if max_hops is None else max_hops
        self.check_url(request.url, purpose)
        for hop in range(hops + 1):
            response = client.send(request, stream=True, follow_redirects=False)
            if response.status_code not in _REDIRECT_STATUSES or "location" not in response.headers:
                return response
            _drain(response)
            target = request.url.join(response.headers["location"])
            if hop == hops:
                reason = "redirects are refused" if hops == 0 else f"more than {hops} redirects"
                raise UrlNotAllowedError(
                    f"URL not allowed for {purpose}: {reason} ({redact_url(request.url)} → {redact_url(target)})"
                )
            try:
                self.check_url(target, purpose)
            except UrlNotAllowedError as exc:
                raise UrlNotAllowedError(f"redirect refused: {exc.message}") from exc
            request = _redirect_request(request, target, response.status_code)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _drain(response: httpx.Response, limit: int = 64 * 1024) -> None:
    """Read a small redirect body so the connection can be reused, then close the response."""
    try:
        received = 0
        for chunk in response.iter_raw():
            received += len(chunk)
            if received > limit:
                break
    except httpx.HTTPError:
        pass  # the body is of no interest; a broken one only costs the connection
    finally:
        response.close()


def _redirect_request(request: httpx.Request, target: httpx.URL, status: int) -> httpx.Request:
    method = "GET" if status == 303 and request.method != "HEAD" else request.method
    headers = httpx.Headers(request.headers)
    headers.pop("host", None)
    if (target.scheme, target.host, target.port) != (request.url.scheme, request.url.host, request.url.port):
        # Never forward credentials to another origin (same rule as httpx's own redirects).
        headers.pop("authorization", None)
        headers.pop("cookie", None)
    content = request.content if method == request.method else None
    if content is None:
        headers.pop("content-length", None)
        headers.pop("content-type", None)
    return httpx.Request(method, target, headers=headers, content=content, extensions=request.extensions)


# Bytes asked of the socket per read. httpcore asks for 64 KiB; on a fast link (S3 in the same
# region, loopback) each read then costs a trip through h11, httpx and the fetcher's pwrite + CRC-32C
# loop for little data. 256 KiB reads cut the fetcher's CPU per GB from 2.35 to 1.34 s over loopback
# (bench/download; 1 MiB gained little more and tripled the download's peak RSS). A read returns
# what has arrived, so a slow link is not held back; TLS hands back at most one record (16 KiB) per
# read whatever is asked, so this helps plain-socket reads most.
READ_SIZE = 256 * 1024


class _LargeReadStream(httpcore.NetworkStream):
    """A network stream that asks the socket for at least :data:`READ_SIZE` bytes per read."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max(max_bytes, READ_SIZE), timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return _LargeReadStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore.SyncBackend):
    """Connects only to addresses the policy accepts, resolving the host itself.

    Checking the URL and then letting the socket layer resolve the name again leaves a window for
    DNS rebinding (the second answer may be 169.254.169.254). Here the checked addresses are the
    ones connected to; TLS still verifies the certificate against the host name (httpcore passes
    the origin host as SNI / server_hostname, not the address we connect to).
    """

    def __init__(self, policy: OutboundPolicy, purpose: Purpose) -> None:
        self._policy = policy
        self._purpose = purpose

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = self._policy.resolve_host(host, port, self._purpose)
        except RetryableError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        last: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for addr in addresses:
            try:
                stream = super().connect_tcp(str(addr), port, timeout, local_address, socket_options)
                return _LargeReadStream(stream)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last


@functools.lru_cache(maxsize=1)
def _default_ssl_context() -> ssl.SSLContext:
    """The default trust store, loaded once per process and shared by every transport built here.

    Loading it costs 10-30 ms, and a client is built per Sectra invocation (and per job): without the
    cache that was most of a webhook's own time. One context serves many connections and hosts (the
    host name is checked per connection); httpcore only sets ALPN on it, always ``http/1.1`` here.
    """
    return httpx.create_ssl_context(verify=True, trust_env=False)


class GuardedTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` that checks every request URL and pins connections to checked IPs."""

    def __init__(
        self,
        policy: OutboundPolicy,
        purpose: Purpose,
        *,
        verify: ssl.SSLContext | str | bool = True,
        limits: httpx.Limits | None = None,
    ) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        if verify is True:
            ssl_context = _default_ssl_context()
        else:
            ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)
        super().__init__(verify=ssl_context, limits=limits, trust_env=False)
        self._policy = policy
        self._purpose = purpose
        # httpx has no public way to give its pool an httpcore network backend, so the pool it just
        # built is replaced by an equivalent one with ours (httpx 0.28 / httpcore 1.0, pinned).
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_GuardedBackend(policy, purpose),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self._policy.check_url(request.url, self._purpose)
        return super().handle_request(request)
