"""Downloads of presigned URLs: parallel ranged GETs streamed to disk, CRC-32C computed on the way.

Built for S3 SigV4 presigned GETs (Techcyte ``scan_urls``, Platform API input artifacts):

- HEAD is not used: a presigned GET URL signs the method, so S3 answers HEAD with 403. The size comes
  from ``GET Range: bytes=0-0`` (the total in ``Content-Range``). A server that ignores ``Range``
  (200, no ``Content-Range``) gets its body streamed from that very response.
- Parts of ``part_size`` bytes are fetched by ``concurrency`` threads sharing one httpx client; each
  writes its part into a preallocated file with ``os.pwrite`` piece by piece as it is read from the
  socket (at most 256 KiB, ``outbound.READ_SIZE``, not re-chunked: see :meth:`_Download._write_body`)
  and hashes every piece as it lands. Part CRCs are joined with :func:`crc32c_combine`, so the file
  is never re-read and memory stays at a few socket reads per thread. The CPU-heavy steps (socket
  reads, ``pwrite``, the CRC's C code) release the GIL, so the threads also spread over the cores.
- Every URL, redirects included, goes through :class:`OutboundPolicy` (purpose DOWNLOAD).
- Messages and logs show URLs as ``scheme://host:port/path``: the query carries the signature.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, NoReturn, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict

from slidebridge.checksums import Crc32cHasher, b64_to_int, crc32c_combine, int_to_b64
from slidebridge.errors import (
    ChecksumMismatchError,
    DownloadFailedError,
    RetryableError,
    UrlExpiredError,
    UrlForbiddenError,
)
from slidebridge.outbound import OutboundPolicy, Purpose

if TYPE_CHECKING:
    import ssl

__all__ = ["DEFAULT_PART_SIZE", "DownloadResult", "download"]

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_PART_SIZE = 16 * MIB
DEFAULT_ATTEMPTS = 4  # per part (and for the size probe), before RetryableError
_PROGRESS_STEP = 1 * MIB  # bytes a thread writes between progress reports
_ERROR_BODY_LIMIT = 64 * 1024  # bytes of an error body read to classify it
_MAX_BACKOFF_S = 30.0
_LOG_EVERY_S = 5.0
# Transient statuses (5xx are all transient too): throttling, timeouts, "too early".
_RETRYABLE_STATUSES = frozenset({408, 425, 429})
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)
# Ask for the stored bytes: a Range addresses them, and a transparently compressed body would not
# match the object's size or CRC.
_IDENTITY = {"Accept-Encoding": "identity"}


class DownloadResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: Path
    size_bytes: int
    crc32c_b64: str
    seconds: float


class _TransientHttpError(RetryableError):
    """A retryable HTTP status, with the server's ``Retry-After`` when it sent one (seconds)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _AbortedError(Exception):
    """Another part failed for good; this one stops without adding its own error."""


class _Probe(NamedTuple):
    size: int
    crc: int | None  # set when the probe's own 200 response already carried the whole file


_T = TypeVar("_T")


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``(first, last, total)`` of a ``Content-Range`` header; ``None`` where absent or ``*``."""
    match = _CONTENT_RANGE.match(value or "")
    if match is None:
        return None, None, None
    first, last, total = match.groups()
    return (
        int(first) if first is not None else None,
        int(last) if last is not None else None,
        int(total) if total != "*" else None,
    )


def _describe(exc: httpx.TransportError) -> str:
    # httpx messages say what failed ("timed out", "peer closed connection ..."); one that quotes a
    # URL (and so maybe a signature) is reduced to the exception's name.
    message = str(exc)
    if not message or "?" in message or "://" in message:
        return type(exc).__name__
    return f"{type(exc).__name__}: {message}"


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(float(response.headers["retry-after"]), _MAX_BACKOFF_S)
    except (KeyError, ValueError):
        return None


def _read_limited(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    try:
        for chunk in response.iter_raw():
            body += chunk
            if len(body) >= limit:
                break
    except httpx.HTTPError:
        pass  # an error body that breaks off is still classified by what arrived
    return bytes(body[:limit])


def _looks_expired(body: bytes) -> bool:
    # S3: <Code>AccessDenied</Code><Message>Request has expired</Message>; temporary credentials
    # behind the presigned URL that ran out: <Code>ExpiredToken</Code>.
    text = body.decode("utf-8", "replace")
    return (
        "Request has expired" in text
        or "<Code>ExpiredToken</Code>" in text
        or ("<Code>AccessDenied</Code>" in text and "expired" in text.lower())
    )


def _preallocate(fd: int, size: int) -> None:
    try:
        # Reserves the blocks, so a full disk fails here rather than halfway through.
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # file systems without fallocate: a sparse file of the right size


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class _Download:
    def __init__(
        self,
        url: str,
        dest: Path,
        *,
        policy: OutboundPolicy,
        client: httpx.Client,
        part_size: int,
        concurrency: int,
        timeout_s: float,
        attempts: int,
        retry_backoff_s: float,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        checked = policy.check_url(url, Purpose.DOWNLOAD)
        self.url = checked.url
        self.redacted = checked.redacted
        self.dest = dest
        self.policy = policy
        self.client = client
        self.part_size = part_size
        self.concurrency = concurrency
        self.timeout = httpx.Timeout(timeout_s)  # connect/read/write/pool each; no total cap
        self.attempts = attempts
        self.retry_backoff_s = retry_backoff_s
        self.progress = progress
        self.abort = threading.Event()
        self._lock = threading.Lock()
        self._done = 0
        self._total = -1
        self._started = time.monotonic()
        self._last_log = self._started
        self.etag: str | None = None

    # --- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _get(self, url: str, range_header: str | None) -> Iterator[httpx.Response]:
        headers = dict(_IDENTITY)
        if range_header is not None:
            headers["Range"] = range_header
        request = self.client.build_request("GET", url, headers=headers, timeout=self.timeout)
        try:
            response = self.policy.send_following_redirects(self.client, request, Purpose.DOWNLOAD)
        except httpx.TransportError as exc:
            raise RetryableError(f"{_describe(exc)} from {self.redacted}") from exc
        try:
            yield response
        except httpx.TransportError as exc:
            raise RetryableError(f"{_describe(exc)} while reading {self.redacted}") from exc
        finally:
            response.close()

    def _raise_for_status(self, response: httpx.Response) -> NoReturn:
        status = response.status_code
        where = f"HTTP {status} from {self.redacted}"
        if status in (401, 403):
            if _looks_expired(_read_limited(response, _ERROR_BODY_LIMIT)):
                raise UrlExpiredError(f"download URL expired ({where})")
            raise UrlForbiddenError(f"download URL forbidden ({where})")
        if status in (404, 410):
            raise DownloadFailedError(f"download URL not found ({where})")
        if status >= 500 or status in _RETRYABLE_STATUSES:
            raise _TransientHttpError(f"transient failure ({where})", _retry_after(response))
        raise DownloadFailedError(f"download failed ({where})")

    def _check_etag(self, response: httpx.Response) -> None:
        # Parts of two versions of an object would pass the size check yet make a corrupt file.
        etag = response.headers.get("etag")
        if self.etag is not None and etag is not None and etag != self.etag:
            raise DownloadFailedError(f"the object changed during the download ({self.redacted})")

    def _advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            now = time.monotonic()
            if self.progress is not None:
                self.progress(self._done, self._total)
            if now - self._last_log >= _LOG_EVERY_S:
                self._last_log = now
                self.log("download progress")

    def log(self, what: str) -> None:
        seconds = max(time.monotonic() - self._started, 1e-6)
        logger.info(
            "%s %s: %d of %s bytes, %.1f s, %.1f MB/s",
            what,
            self.redacted,
            self._done,
            self._total if self._total >= 0 else "?",
            seconds,
            self._done / seconds / 1e6,
        )

    def _with_retries(self, what: str, attempt_once: Callable[[], _T]) -> _T:
        last: RetryableError | None = None
        for attempt in range(self.attempts):
            if self.abort.is_set():
                raise _AbortedError
            try:
                return attempt_once()
            except RetryableError as exc:
                last = exc
                if attempt + 1 == self.attempts:
                    break
                delay = self.retry_backoff_s * 2**attempt * random.uniform(0.5, 1.5)  # noqa: S311 - jitter
                if isinstance(exc, _TransientHttpError) and exc.retry_after_s is not None:
                    delay = max(delay, exc.retry_after_s)
                logger.warning(
                    "%s of %s failed (attempt %d of %d), retrying in %.2f s: %s",
                    what,
                    self.redacted,
                    attempt + 1,
                    self.attempts,
                    delay,
                    exc,
                )
                if self.abort.wait(min(delay, _MAX_BACKOFF_S)):
                    raise _AbortedError from exc
        raise RetryableError(f"{what} of {self.redacted} failed after {self.attempts} attempts: {last}")

    # --- the download --------------------------------------------------------------------------

    def run(self) -> tuple[int, int]:
        """Download to ``dest``; returns ``(crc32c, size)``."""

        def probe() -> _Probe:
            with self._get(self.url, "bytes=0-0") as response:
                if response.status_code == 206:
                    first, _last, total = _parse_content_range(response.headers.get("content-range"))
                    if first == 0 and total is not None:
                        # Later parts go straight to where any redirect led (checked on the way).
                        self.url = str(response.url)
                        self.etag = response.headers.get("etag")
                        _read_limited(response, 1024)  # the one byte, so the connection is reused
                        return _Probe(size=total, crc=None)
                    raise RetryableError(f"unusable Content-Range in a 206 from {self.redacted}")
                if response.status_code == 416:
                    _first, _last, total = _parse_content_range(response.headers.get("content-range"))
                    if total == 0:  # S3's answer to bytes=0-0 on an empty object
                        return _Probe(size=0, crc=None)
                    raise DownloadFailedError(f"download failed (HTTP 416 from {self.redacted})")
                if response.status_code == 200:
                    crc, size = self._stream_whole(response)
                    return _Probe(size=size, crc=crc)
                self._raise_for_status(response)

        found = self._with_retries("size probe", probe)
        if found.crc is not None:
            return found.crc, found.size
        return self._ranged(size=found.size)

    def _stream_whole(self, response: httpx.Response) -> tuple[int, int]:
        """Write a 200 body sequentially (server without Range support); ``(crc, size)``."""
        expected = response.headers.get("content-length")
        self._total = int(expected) if expected is not None and expected.isdigit() else -1
        logger.info("download %s: server ignores Range, streaming in one GET", self.redacted)
        hasher = Crc32cHasher()
        fd = os.open(self.dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_body(response, fd, 0, hasher, limit=None, what=f"from {self.redacted}")
        finally:
            os.close(fd)
        if self._total >= 0 and hasher.length != self._total:
            self._advance(-hasher.length)
            raise RetryableError(f"connection closed after {hasher.length} of {self._total} bytes from {self.redacted}")
        return hasher.value, hasher.length

    def _write_body(
        self, response: httpx.Response, fd: int, offset: int, hasher: Crc32cHasher, *, limit: int | None, what: str
    ) -> None:
        """Write the body at ``offset`` of ``fd``, hashing each piece as it lands; progress about every MiB.

        ``iter_raw()`` without a chunk size hands over the socket reads (at most 256 KiB) as they
        are: re-chunking them into bigger blocks copied every byte once more under the GIL, which
        cost more CPU than the extra ``pwrite`` calls do (``python -m bench.download``). On failure
        the bytes it reported are taken back: they will be fetched again, or not at all.
        """
        reported = 0
        try:
            for chunk in response.iter_raw():
                if self.abort.is_set():
                    raise _AbortedError
                if limit is not None and hasher.length + len(chunk) > limit:
                    raise RetryableError(f"more bytes than asked for in {what}")
                _pwrite_all(fd, chunk, offset + hasher.length)
                hasher.update(chunk)
                if hasher.length - reported >= _PROGRESS_STEP:
                    self._advance(hasher.length - reported)
                    reported = hasher.length
        except BaseException:
            self._advance(-reported)
            raise
        self._advance(hasher.length - reported)

    def _ranged(self, size: int) -> tuple[int, int]:
        self._total = size
        starts = list(range(0, size, self.part_size))
        logger.info(
            "download start %s: %d bytes in %d parts of %d bytes, %d threads",
            self.redacted,
            size,
            len(starts),
            self.part_size,
            min(self.concurrency, max(len(starts), 1)),
        )
        fd = os.open(self.dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if size == 0:
                return 0, 0
            _preallocate(fd, size)
            crcs = self._parts(fd, starts, size)
        finally:
            os.close(fd)
        crc = 0
        for start, part_crc in zip(starts, crcs, strict=True):
            crc = crc32c_combine(crc, part_crc, min(start + self.part_size, size) - start)
        return crc, size

    def _parts(self, fd: int, starts: list[int], size: int) -> list[int]:
        def fetch(start: int) -> int:
            end = min(start + self.part_size, size) - 1
            return self._with_retries(f"bytes {start}-{end}", lambda: self._fetch_part(fd, start, end, size))

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(starts))) as pool:
            futures: list[Future[int]] = [pool.submit(fetch, start) for start in starts]
            done, _pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and f.exception() is not None]
            if failed:
                # Stop the other threads between chunks; queued parts never start.
                self.abort.set()
                for future in futures:
                    future.cancel()
                wait(futures)
                # A part's own error, not a neighbour's "aborted".
                errors = [f.exception() for f in futures if f.done() and not f.cancelled()]
                own = [e for e in errors if e is not None and not isinstance(e, _AbortedError)]
                raise own[0] if own else RetryableError(f"download of {self.redacted} aborted")
            return [future.result() for future in futures]

    def _fetch_part(self, fd: int, start: int, end: int, size: int) -> int:
        hasher = Crc32cHasher()
        with self._get(self.url, f"bytes={start}-{end}") as response:
            if response.status_code == 200:
                raise RetryableError(f"server ignored Range for bytes {start}-{end} ({self.redacted})")
            if response.status_code != 206:
                self._raise_for_status(response)
            first, last, total = _parse_content_range(response.headers.get("content-range"))
            if total is not None and total != size:
                raise DownloadFailedError(
                    f"the object changed size during the download, from {size} to {total} bytes ({self.redacted})"
                )
            if (first, last) != (start, end):
                raise RetryableError(
                    f"asked for bytes {start}-{end}, got Content-Range "
                    f"{response.headers.get('content-range')!r} ({self.redacted})"
                )
            self._check_etag(response)
            want = end - start + 1
            self._write_body(response, fd, start, hasher, limit=want, what=f"bytes {start}-{end}")
        if hasher.length != want:
            # This attempt's bytes will be fetched again (or not at all).
            self._advance(-hasher.length)
            raise RetryableError(f"connection closed after {hasher.length} of {want} bytes of bytes {start}-{end}")
        return hasher.value


def download(
    url: str,
    dest: Path,
    *,
    policy: OutboundPolicy,
    expected_crc32c_b64: str | None,
    part_size: int = DEFAULT_PART_SIZE,
    concurrency: int = 8,
    timeout_s: float = 30.0,
    client: httpx.Client | None = None,
    progress: Callable[[int, int], None] | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
    retry_backoff_s: float = 0.5,
    verify: ssl.SSLContext | str | bool = True,
) -> DownloadResult:
    """Download ``url`` to ``dest`` and check its CRC-32C; ``dest`` is removed on any failure.

    ``progress(done_bytes, total_bytes)`` is called from worker threads (serialised; ``total_bytes``
    is -1 while unknown). ``client``: a caller's httpx client (redirects are still checked by hand,
    ``follow_redirects`` is ignored); by default one is built by ``policy`` with ``verify`` (a CA
    bundle path for hospital-internal CAs) and closed afterwards.

    Raises ``UrlNotAllowedError``, ``UrlExpiredError``, ``UrlForbiddenError``,
    ``DownloadFailedError`` (not found, size or object changed), ``ChecksumMismatchError`` (user
    errors), or ``RetryableError`` once a part has failed ``attempts`` times with a transient fault.
    """
    if part_size < 1 or concurrency < 1 or attempts < 1:
        raise ValueError("part_size, concurrency and attempts must be >= 1")
    expected: int | None = None
    if expected_crc32c_b64 is not None:
        try:
            expected = b64_to_int(expected_crc32c_b64)
        except ValueError as exc:
            raise ChecksumMismatchError(f"expected checksum {expected_crc32c_b64!r} is not a base64 CRC-32C") from exc
    # Checked before anything is opened or created: a refused URL leaves ``dest`` alone.
    policy.check_url(url, Purpose.DOWNLOAD)
    own_client = client is None
    http = client or policy.client(
        Purpose.DOWNLOAD,
        verify=verify,
        limits=httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1),
        timeout=httpx.Timeout(timeout_s),
        headers=_IDENTITY,
    )
    started = time.monotonic()
    job = _Download(
        url,
        dest,
        policy=policy,
        client=http,
        part_size=part_size,
        concurrency=concurrency,
        timeout_s=timeout_s,
        attempts=attempts,
        retry_backoff_s=retry_backoff_s,
        progress=progress,
    )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        crc, size = job.run()
        actual = int_to_b64(crc)
        if expected is not None and crc != expected:
            raise ChecksumMismatchError(
                f"checksum mismatch for {job.redacted}: expected {expected_crc32c_b64}, got {actual} ({size} bytes)"
            )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    finally:
        if own_client:
            http.close()
    seconds = time.monotonic() - started
    job.log("download done")
    return DownloadResult(path=dest, size_bytes=size, crc32c_b64=actual, seconds=seconds)
