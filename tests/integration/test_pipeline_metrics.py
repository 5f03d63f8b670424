"""The job's ``item metrics`` line: the stages the dashboard plots, the split of ``analyse`` into
tissue / tiles + classify / regions, and the classifier's wait, as bench/slide.py and the job_metrics
Lambda read it."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_job.__main__ import main
from bench.slide import METRICS, stage_seconds
from lambdas.job_metrics.handler import parse_job_line
from slidebridge.checksums import crc32c_b64_of_file
from slidebridge.runs import InputArtifact, Item, Run
from slidebridge.settings import get_settings
from slidebridge.store import RunStore


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served_slide(tmp_path: Path, small_tiff_slide: Path) -> Iterator[str]:
    root = tmp_path / "served"
    root.mkdir()
    (root / "slide").write_bytes(small_tiff_slide.read_bytes())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slide"
    server.shutdown()


def test_item_metrics_split_analyse_and_report_the_classifier_wait(
    store: RunStore,
    served_slide: str,
    small_tiff_slide: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("SLIDEBRIDGE_SCRATCH_DIR", str(tmp_path / "scratch"))
    monkeypatch.setenv("SLIDEBRIDGE_DOWNLOAD_HOSTS", "127.0.0.1")
    monkeypatch.setenv("SLIDEBRIDGE_TILE_WORKERS", "1")
    get_settings.cache_clear()
    run = Run(application_id="he-tissue", version_number="1.0.0", organization_id="o", submitted_by="u")
    item = Item(
        run_id=run.run_id,
        index=0,
        external_id="slide",
        input_artifacts=[
            InputArtifact(
                name="whole_slide_image",
                download_url=served_slide,
                metadata={"checksum_base64_crc32c": crc32c_b64_of_file(small_tiff_slide)},
            )
        ],
    )
    store.create_run(run, [item])

    with caplog.at_level(logging.INFO, logger="batch_job"):
        assert main([run.run_id]) == 0

    (message,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("item metrics ")]
    match = METRICS.search(message)
    assert match is not None
    metrics = json.loads(match.group(1))
    seconds, split = metrics["seconds"], metrics["analyse_seconds"]
    # The dashboard's stages are unchanged; analyse is split apart, not replaced.
    assert list(seconds) == ["download", "open", "analyse", "artifacts", "delivery"]
    assert list(split) == ["tissue", "tiles_classify", "regions"]
    assert all(value >= 0 for value in split.values())
    assert sum(split.values()) == pytest.approx(seconds["analyse"], abs=0.1)
    assert 0.0 <= metrics["classifier_wait_fraction"] <= 1.0
    assert list(stage_seconds(metrics)) == [
        "download",
        "open",
        "tissue",
        "tiles + classify",
        "regions",
        "artifacts",
        "delivery",
    ]
    # The job_metrics Lambda still reads the line (it ignores the added fields).
    line = f"2026-01-01 00:00:00,000 INFO batch_job.pipeline run={run.run_id} {message}"
    parsed = parse_job_line(line)
    assert parsed is not None and parsed.item is not None
    assert parsed.item.seconds == seconds
    assert parsed.item.tiles == metrics["tiles"]
