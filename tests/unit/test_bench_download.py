"""bench.download on a small file: the S3-like server, the cached source and the result rows (no timings)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import httpx
import pytest

from bench import BenchRow
from bench import download as bench_download
from bench.download import NotEnoughDiskError, PresignedFileServer, cached_source, main, run, serve_in_thread
from slidebridge.checksums import crc32c_b64_of_bytes

MIB = 1024 * 1024
SIZE = 6 * MIB + 12_345  # odd, so the fetcher's last part is short


class Source(NamedTuple):
    path: Path
    crc32c_b64: str


@pytest.fixture
def source(tmp_path: Path) -> Source:
    return Source(*cached_source(tmp_path / "cache", SIZE))


@pytest.fixture
def server(source: Source) -> Iterator[PresignedFileServer]:
    with serve_in_thread(source.path) as srv:
        yield srv


def test_source_file_is_cached_with_its_checksum(source: Source, tmp_path: Path) -> None:
    data = source.path.read_bytes()
    assert len(data) == SIZE
    assert source.crc32c_b64 == crc32c_b64_of_bytes(data)
    written = source.path.stat().st_mtime_ns
    again = cached_source(tmp_path / "cache", SIZE)
    assert again == (source.path, source.crc32c_b64)
    assert source.path.stat().st_mtime_ns == written  # reused, not written again


def test_not_enough_disk_is_said_plainly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: SimpleNamespace(total=100 * MIB, used=99 * MIB, free=MIB))
    with pytest.raises(NotEnoughDiskError, match=r"not enough free disk .*--size-gb"):
        cached_source(tmp_path, 64 * MIB)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_head_is_refused_like_a_presigned_get(server: PresignedFileServer) -> None:
    response = httpx.head(server.url)
    assert response.status_code == 403
    assert server.requests == [("HEAD", None, 403)]


def test_signature_and_key_must_match(server: PresignedFileServer) -> None:
    tampered = server.url[:-4] + ("0000" if not server.url.endswith("0000") else "1111")
    assert httpx.get(tampered, headers={"Range": "bytes=0-0"}).status_code == 403
    wrong_key = server.url.replace("/scan?", "/scan.tiff?")
    assert httpx.get(wrong_key, headers={"Range": "bytes=0-0"}).status_code == 404


@pytest.mark.parametrize(
    ("range_header", "first", "last"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=100-199", 100, 199),
        (f"bytes={SIZE - 10}-", SIZE - 10, SIZE - 1),
        ("bytes=-7", SIZE - 7, SIZE - 1),
        (f"bytes={SIZE - 5}-{SIZE + 100}", SIZE - 5, SIZE - 1),  # clamped to the end, as S3 does
    ],
)
def test_ranges_are_served(
    server: PresignedFileServer, source: Source, range_header: str, first: int, last: int
) -> None:
    data = source.path.read_bytes()
    response = httpx.get(server.url, headers={"Range": range_header})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {first}-{last}/{SIZE}"
    assert response.content == data[first : last + 1]


def test_unsatisfiable_range_and_whole_file(server: PresignedFileServer, source: Source) -> None:
    refused = httpx.get(server.url, headers={"Range": f"bytes={SIZE}-"})
    assert refused.status_code == 416
    assert refused.headers["content-range"] == f"bytes */{SIZE}"
    whole = httpx.get(server.url)
    assert whole.status_code == 200
    assert whole.content == source.path.read_bytes()


def _check_rows(rows: list[BenchRow]) -> None:
    assert [(row.unit, row.higher_is_better) for row in rows] == [("MB/s", True), ("CPU s/GB", False)]
    for row in rows:
        assert row.stage.startswith("download ")
        assert row.baseline > 0
        assert row.ours > 0
        assert row.ratio > 0


def test_run_in_process_downloads_verifies_and_cleans_up(source: Source, tmp_path: Path) -> None:
    report = run(
        SIZE, part_size=1 * MIB, concurrency=4, rounds=2, baseline_crc=True, cache_dir=tmp_path / "cache", isolate=False
    )
    # ABBA: the second round runs ours first.
    assert [t.kind for t in report.trials] == ["baseline", "baseline_crc", "ours", "ours", "baseline_crc", "baseline"]
    for trial in report.trials:
        assert trial.size_bytes == SIZE
        assert trial.wall_s > 0
        assert trial.cpu_s >= 0
        assert trial.crc32c_b64 == (None if trial.kind == "baseline" else source.crc32c_b64)
    assert report.summary("ours").mb_per_s == pytest.approx(report.rows()[0].ours)
    _check_rows(report.rows())
    # Only the cached source is left: every download was deleted.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [source.path.name, f"source-{SIZE}.crc32c"]


def test_cli_runs_isolated_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    size_gb = SIZE / bench_download.GIB
    rows = main(["--size-gb", str(size_gb), "--rounds", "1", "--part-mb", "1", "--cache-dir", str(tmp_path)])
    _check_rows(rows)
    out = capsys.readouterr().out
    assert "throughput ours / baseline:" in out
    assert "server" in out  # the server ran in a process of its own, its CPU is reported
