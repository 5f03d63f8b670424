"""Slide download over loopback: one streamed httpx GET (baseline) against ``batch_job.fetch`` (ours).

    python -m bench.download [--size-gb 2] [--part-mb 16] [--concurrency 8] [--rounds 3] [--baseline-crc]

A loopback HTTP server (its own process, so its work does not compete with the client for a GIL)
serves a generated file behind a presigned-style URL, as S3 does for a SigV4 presigned GET: the
``X-Amz-Signature`` must match, HEAD is refused with 403 (the method is signed), ``Range`` is
honoured and the body goes out with ``sendfile`` so the server is not the bottleneck.

- baseline: ``httpx.Client.stream`` + ``iter_bytes(1 MiB)`` written to disk; it computes nothing
  else (no checksum). ``--baseline-crc`` adds a variant that also hashes CRC-32C while streaming.
- ours: ``batch_job.fetch.download`` (size from ``Range: bytes=0-0``, parallel ranged GETs, part
  CRCs combined), given the expected CRC-32C, so its result is verified.

They alternate in ABBA order (baseline, ours, ours, baseline, ...) and medians are reported, so
noise on a shared machine hits both. Each download runs in a fresh process, whose peak RSS is reset
first (Linux ``/proc/self/clear_refs``), so the growth reported is that download's. CPU seconds are
the client process's (all threads, user + system); the server's are shown apart, for neither side.
Downloaded files go to the page cache (no fsync, for neither) and are deleted after each download.
The source file is cached under ``.bench-data/download/`` (the first run writes it); the disk must
hold it and one download.

On loopback the client's CPU is the limit, not the network: the baseline spends it on one thread
in httpx's ``iter_bytes(1 MiB)`` re-chunking (each byte copied into a ``BytesIO`` and sliced out
again) on top of h11's own copies. Ours reads the socket 256 KiB at a time (httpcore
asks for 64 KiB; ``slidebridge.outbound.READ_SIZE``), takes the reads as they come, and its
``pwrite`` and CRC-32C (C code) run outside the GIL on several threads.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import multiprocessing
import os
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit

from bench import BenchRow

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".bench-data" / "download"
MIB = 1024 * 1024
GIB = 1024 * MIB
_BLOCK = 64 * MIB  # the random block the source file repeats: random enough, cheap to write
_DISK_MARGIN = 512 * MIB
_KEY = "/slides/bench-0001/scan"  # no extension, as Techcyte scan URLs
_SECRET = b"bench-download-secret"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
KINDS = ("baseline", "baseline_crc", "ours")


class NotEnoughDiskError(RuntimeError):
    """The cache/download directory cannot hold the source file and one download."""


# --- the source file ---------------------------------------------------------------------------


def _check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed + _DISK_MARGIN:
        raise NotEnoughDiskError(
            f"not enough free disk in {directory}: {free / GIB:.1f} GiB free, the benchmark needs "
            f"{(needed + _DISK_MARGIN) / GIB:.1f} GiB (source file + one download + margin); "
            "use --size-gb or --cache-dir"
        )


def cached_source(cache_dir: Path, size: int) -> tuple[Path, str]:
    """``(path, crc32c_b64)`` of a ``size``-byte file, written once and reused; disk space checked first."""
    from slidebridge.checksums import crc32c_b64_of_file  # noqa: PLC0415 - keeps the server process light

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"source-{size}.bin"
    sidecar = path.with_suffix(".crc32c")
    have = path.stat().st_size == size if path.exists() else False
    _check_space(cache_dir, size if have else 2 * size)
    if have and sidecar.exists():
        return path, sidecar.read_text().strip()
    block = random.Random(size).randbytes(min(_BLOCK, size))
    partial = path.with_suffix(".partial")
    with partial.open("wb") as fh:
        left = size
        while left:
            piece = block[: min(left, len(block))]
            fh.write(piece)
            left -= len(piece)
    partial.replace(path)  # a run killed halfway leaves no truncated "cached" file behind
    crc = crc32c_b64_of_file(path)
    sidecar.write_text(crc + "\n")
    return path, crc


# --- the presigned-style server ----------------------------------------------------------------


def _signature(path: str, query: str) -> str:
    return hmac.new(_SECRET, f"GET\n{path}\n{query}".encode(), hashlib.sha256).hexdigest()


def presigned_query(path: str) -> str:
    """Query string shaped like a SigV4 presigned GET; the signature covers path and the other fields."""
    fields = urlencode(
        {
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": "AKIABENCH/20260101/us-east-1/s3/aws4_request",
            "X-Amz-Date": "20260101T000000Z",
            "X-Amz-Expires": "3600",
            "X-Amz-SignedHeaders": "host",
        }
    )
    return f"{fields}&X-Amz-Signature={_signature(path, fields)}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the fetcher reuses its connections
    server: PresignedFileServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _error(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
        body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code></Error>'.encode()
        self.server.record(self.command, self.headers.get("Range"), status)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)) if self.command != "HEAD" else "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        # A presigned GET URL signs the method: S3 answers HEAD with 403.
        self._error(403, "SignatureDoesNotMatch")

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != _KEY:
            return self._error(404, "NoSuchKey")
        fields = parse_qsl(parts.query, keep_blank_values=True)
        given = dict(fields).get("X-Amz-Signature", "")
        signed = urlencode([(k, v) for k, v in fields if k != "X-Amz-Signature"])
        if not hmac.compare_digest(given, _signature(parts.path, signed)):
            return self._error(403, "SignatureDoesNotMatch")
        size = self.server.size
        first, last, status = 0, size - 1, 200
        match = _RANGE.match(self.headers.get("Range", "").strip())
        if match is not None and match.group(1) + match.group(2):  # S3 ignores a Range it cannot parse
            start_s, end_s = match.groups()
            if start_s:
                first, last = int(start_s), min(int(end_s), size - 1) if end_s else size - 1
            else:  # bytes=-N: the last N bytes
                first, last = max(size - int(end_s), 0), size - 1
            if first >= size or first > last:
                return self._error(416, "InvalidRange", {"Content-Range": f"bytes */{size}"})
            status = 206
        self.server.record("GET", self.headers.get("Range"), status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", self.server.etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if last >= first:
            with self.server.path.open("rb") as fh:
                # Kernel to socket, no copy through Python: the server must not be the bottleneck.
                self.connection.sendfile(fh, first, last - first + 1)
        return None


class PresignedFileServer(ThreadingHTTPServer):
    """Serves one file at a presigned-style URL (``url``), like S3 does for a presigned GET."""

    daemon_threads = True
    request_queue_size = 64  # the fetcher opens its connections at once

    def __init__(self, path: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.path = path
        self.size = path.stat().st_size
        self.etag = f'"{self.size:x}-bench"'
        self.requests: list[tuple[str, str | None, int]] = []  # (method, Range header, status)
        self._lock = threading.Lock()

    def record(self, method: str, range_header: str | None, status: int) -> None:
        with self._lock:
            self.requests.append((method, range_header, status))

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up mid-body (an aborted download) is not a server fault.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{_KEY}?{presigned_query(_KEY)}"


@contextmanager
def serve_in_thread(path: Path) -> Iterator[PresignedFileServer]:
    """The server on a thread of this process (tests)."""
    server = PresignedFileServer(path)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _serve_forever(path: str, conn: Connection) -> None:
    server = PresignedFileServer(Path(path))
    conn.send(server.url)
    conn.close()
    server.serve_forever()


class Served(NamedTuple):
    url: str
    pid: int | None  # the server's process, when it has one of its own


@contextmanager
def serve_in_process(path: Path) -> Iterator[Served]:
    """The server in a process of its own."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_serve_forever, args=(str(path), sender), daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(60):
            raise RuntimeError("the bench server did not start")
        yield Served(str(receiver.recv()), process.pid)
    finally:
        process.terminate()
        process.join(10)


# --- the clients -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    kind: str
    size_bytes: int
    wall_s: float
    cpu_s: float  # user + system CPU of the client process, all threads
    rss_growth_bytes: int  # peak resident memory during the download minus before it
    crc32c_b64: str | None  # None where the client computed none
    server_cpu_s: float | None = None  # CPU of the server process meanwhile (sendfile, loopback TCP)

    @property
    def mb_per_s(self) -> float:
        return self.size_bytes / self.wall_s / 1e6

    @property
    def cpu_s_per_gb(self) -> float:
        return self.cpu_s / (self.size_bytes / 1e9)

    @property
    def server_cpu_s_per_gb(self) -> float | None:
        return None if self.server_cpu_s is None else self.server_cpu_s / (self.size_bytes / 1e9)


def _process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), from Linux /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _proc_status_bytes(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _rss_mark() -> int:
    """Resident memory now, with the kernel's peak reset to it, so a later peak is this download's."""
    try:
        # Linux: writing 5 resets VmHWM (the peak RSS) to the current RSS.
        Path("/proc/self/clear_refs").write_text("5")
        now = _proc_status_bytes("VmRSS")
    except OSError:
        now = None
    return now if now is not None else _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _baseline(url: str, dest: Path, with_crc: bool) -> tuple[int, str | None]:
    import httpx  # noqa: PLC0415 - imported before the clock starts (see measure)

    from slidebridge.checksums import Crc32cHasher  # noqa: PLC0415

    hasher = Crc32cHasher() if with_crc else None
    size = 0
    with (
        httpx.Client(timeout=30.0, trust_env=False) as client,
        client.stream("GET", url) as response,
        dest.open("wb") as fh,
    ):
        response.raise_for_status()
        for chunk in response.iter_bytes(MIB):
            fh.write(chunk)
            if hasher is not None:
                hasher.update(chunk)
            size += len(chunk)
    return size, hasher.b64 if hasher is not None else None


def measure(
    kind: str,
    url: str,
    dest: Path,
    *,
    expected_crc32c_b64: str,
    part_size: int,
    concurrency: int,
) -> Trial:
    """One download by ``kind`` (one of :data:`KINDS`); the caller deletes ``dest``."""
    # Imports before the clock and the memory baseline, so neither counts them.
    import httpx  # noqa: F401, PLC0415

    from batch_job.fetch import download  # noqa: PLC0415
    from slidebridge.outbound import OutboundPolicy, Purpose  # noqa: PLC0415

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    policy = OutboundPolicy({Purpose.DOWNLOAD: ["127.0.0.1"]})
    rss_before = _rss_mark()
    cpu_before = time.process_time()
    started = time.perf_counter()
    crc: str | None
    if kind == "ours":
        result = download(
            url,
            dest,
            policy=policy,
            expected_crc32c_b64=expected_crc32c_b64,
            part_size=part_size,
            concurrency=concurrency,
        )
        size, crc = result.size_bytes, result.crc32c_b64
    else:
        size, crc = _baseline(url, dest, with_crc=kind == "baseline_crc")
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    if crc is not None and crc != expected_crc32c_b64:
        raise RuntimeError(f"{kind}: CRC-32C {crc}, expected {expected_crc32c_b64}")
    if dest.stat().st_size != size:
        raise RuntimeError(f"{kind}: {dest.stat().st_size} bytes on disk, {size} received")
    return Trial(kind, size, wall, cpu, max(_peak_rss_bytes() - rss_before, 0), crc)


# --- the benchmark -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadReport:
    size_bytes: int
    part_size: int
    concurrency: int
    trials: list[Trial]

    def of(self, kind: str) -> list[Trial]:
        return [t for t in self.trials if t.kind == kind]

    def median(self, kind: str, metric: str) -> float:
        return float(statistics.median(getattr(t, metric) for t in self.of(kind)))

    def summary(self, kind: str) -> Trial:
        """Median wall and CPU seconds of ``kind``'s downloads, and the largest peak RSS growth."""
        trials = self.of(kind)
        servers = [t.server_cpu_s for t in trials if t.server_cpu_s is not None]
        return Trial(
            kind,
            self.size_bytes,
            wall_s=self.median(kind, "wall_s"),
            cpu_s=self.median(kind, "cpu_s"),
            rss_growth_bytes=max(t.rss_growth_bytes for t in trials),
            crc32c_b64=trials[0].crc32c_b64,
            server_cpu_s=statistics.median(servers) if len(servers) == len(trials) else None,
        )

    @property
    def speedup(self) -> float:
        """Throughput of ours over the baseline's, from their median wall times."""
        return self.summary("ours").mb_per_s / self.summary("baseline").mb_per_s

    def rows(self) -> list[BenchRow]:
        gb = f"{self.size_bytes / 1e9:.1f} GB"
        baseline, ours = self.summary("baseline"), self.summary("ours")
        return [
            BenchRow(f"download {gb} loopback, throughput", baseline.mb_per_s, ours.mb_per_s, "MB/s"),
            BenchRow(
                f"download {gb} loopback, client CPU",
                baseline.cpu_s_per_gb,
                ours.cpu_s_per_gb,
                "CPU s/GB",
                higher_is_better=False,
            ),
        ]


def run(
    size: int,
    *,
    part_size: int = 16 * MIB,
    concurrency: int = 8,
    rounds: int = 3,
    baseline_crc: bool = False,
    cache_dir: Path = DEFAULT_CACHE,
    isolate: bool = True,
    echo: bool = False,
) -> DownloadReport:
    """Alternate baseline and ours ``rounds`` times on one ``size``-byte file served over loopback.

    ``isolate``: each download in a fresh process (its own peak RSS, no state carried over) and the
    server in another; without it everything runs in this process (quick tests).
    """
    source, crc = cached_source(cache_dir, size)
    kinds = ["baseline", *(["baseline_crc"] if baseline_crc else []), "ours"]
    trials: list[Trial] = []
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="downloads-") as scratch:
        serving = serve_in_process(source) if isolate else _serve_in_thread_url(source)
        with serving as served:
            for round_no in range(rounds):
                # ABBA order (baseline first, then ours first, ...): whatever the previous download
                # leaves behind (memory to reclaim, a busier neighbour) falls on both alike.
                for kind in kinds if round_no % 2 == 0 else kinds[::-1]:
                    dest = Path(scratch) / f"{kind}-{round_no}.bin"
                    one = partial(
                        measure,
                        kind,
                        served.url,
                        dest,
                        expected_crc32c_b64=crc,
                        part_size=part_size,
                        concurrency=concurrency,
                    )
                    try:
                        if isolate:
                            # A fresh process per download: its peak RSS is this download's alone.
                            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                                server_before = _process_cpu_s(served.pid)
                                trial = pool.submit(one).result()
                                server_after = _process_cpu_s(served.pid)
                            if server_before is not None and server_after is not None:
                                trial = replace(trial, server_cpu_s=server_after - server_before)
                        else:
                            trial = one()
                    finally:
                        dest.unlink(missing_ok=True)
                    trials.append(trial)
                    if echo:
                        print(f"  round {round_no + 1}  {_describe(trial)}", flush=True)
    return DownloadReport(size, part_size, concurrency, trials)


def _describe(trial: Trial) -> str:
    server = trial.server_cpu_s_per_gb
    return (
        f"{trial.kind:<12} {trial.wall_s:6.2f} s  {trial.mb_per_s:6.0f} MB/s  client {trial.cpu_s_per_gb:4.2f} CPU s/GB"
        + (f"  server {server:4.2f} CPU s/GB" if server is not None else "")
        + f"  peak RSS +{trial.rss_growth_bytes / MIB:.0f} MiB"
    )


@contextmanager
def _serve_in_thread_url(path: Path) -> Iterator[Served]:
    with serve_in_thread(path) as server:
        yield Served(server.url, None)


def main(argv: list[str] | None = None) -> list[BenchRow]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="file size in GiB (2 GiB = 2.15 GB)")
    parser.add_argument("--part-mb", type=int, default=16, help="ranged GET part size in MiB (ours)")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel ranged GETs (ours)")
    parser.add_argument("--rounds", type=int, default=3, help="baseline/ours pairs; medians are reported")
    parser.add_argument("--baseline-crc", action="store_true", help="also a baseline that hashes CRC-32C")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="source file and scratch")
    args = parser.parse_args(argv)
    size = int(args.size_gb * GIB)
    print(
        f"download {size / 1e9:.2f} GB over loopback: parts of {args.part_mb} MiB, {args.concurrency} threads, "
        f"{os.cpu_count()} cores, {args.rounds} rounds"
    )
    try:
        report = run(
            size,
            part_size=args.part_mb * MIB,
            concurrency=args.concurrency,
            rounds=args.rounds,
            baseline_crc=args.baseline_crc,
            cache_dir=args.cache_dir,
            echo=True,
        )
    except NotEnoughDiskError as exc:
        raise SystemExit(str(exc)) from None
    print("medians (peak RSS: the largest):")
    for kind in KINDS:
        if report.of(kind):
            print(f"  {_describe(report.summary(kind))}")
    print(f"throughput ours / baseline: {report.speedup:.2f}x (goal: at least 2x)")
    rows = report.rows()
    for row in rows:
        print(f"  {row.summary()}")
    return rows


if __name__ == "__main__":
    main()
