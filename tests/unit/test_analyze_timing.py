"""Where the analysis time goes: the tissue / tiles + classify / regions split, and how long the
classifier waited for tiles (the overlap of reading and classifying)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from batch_job.analyze import AnalysisTimings, ClassifyStats, analyze_slide_timed, classify_batches
from batch_job.classifiers import get_classifier
from batch_job.slide import TileSpec
from bench.slide import stage_seconds
from slidebridge.analysis import SlideAnalysis


class FakeClock:
    """A clock that moves only when told to, so the accounting can be checked exactly."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _spec(index: int) -> TileSpec:
    return TileSpec(
        col=index, row=0, x=index * 8, y=0, width=8, height=8, level=0, read_width=8, read_height=8, tissue_fraction=1.0
    )


class SlowClassifier:
    """Two classes; takes ``predict_s`` of the fake clock per batch; class 1 gets the tile's first pixel / 255."""

    application_id = "fake"
    version = "0"
    tile_px = 2
    mpp = 1.0
    class_names = ("a", "b")
    class_colors = ((0, 0, 0), (255, 255, 255))
    background_class = None

    def __init__(self, clock: FakeClock, predict_s: float) -> None:
        self.clock, self.predict_s = clock, predict_s

    def predict(self, batch: NDArray[np.uint8]) -> NDArray[np.float32]:
        self.clock.now += self.predict_s
        b = batch[:, 0, 0, 0].astype(np.float32) / 255.0
        return np.stack([1.0 - b, b], axis=1).astype(np.float32)


def _batches(
    clock: FakeClock, sizes: list[int], read_s: float, stop_s: float = 0.0, closed: list[bool] | None = None
) -> Iterator[tuple[list[TileSpec], NDArray[np.uint8]]]:
    """A tile reader that takes ``read_s`` per batch to hand it over and ``stop_s`` to shut down."""
    first = 0
    try:
        for size in sizes:
            clock.now += read_s
            pixels = np.zeros((size, 2, 2, 3), np.uint8)
            pixels[:, 0, 0, 0] = np.arange(first, first + size)
            yield [_spec(i) for i in range(first, first + size)], pixels
            first += size
        clock.now += stop_s
    finally:
        if closed is not None:
            closed.append(True)


def test_wait_is_the_time_spent_getting_the_next_batch() -> None:
    clock = FakeClock()
    classifier = SlowClassifier(clock, predict_s=1.0)
    probabilities, stats = classify_batches(
        _batches(clock, [4, 4, 2], read_s=3.0, stop_s=2.0), classifier, total=10, clock=clock
    )
    assert (stats.tiles, stats.batches) == (10, 3)
    assert stats.waited_s == pytest.approx(9.0)  # 3 batches × 3 s; the reader's shut-down is not waiting
    assert stats.computed_s == pytest.approx(3.0)
    assert stats.total_s == pytest.approx(14.0)
    assert stats.wait_fraction == pytest.approx(9.0 / 14.0)
    # In order, one row per tile.
    np.testing.assert_allclose(probabilities[:, 1], np.arange(10) / 255.0, rtol=1e-6)


def test_a_reader_that_keeps_ahead_leaves_the_classifier_no_wait() -> None:
    clock = FakeClock()
    _, stats = classify_batches(
        _batches(clock, [8] * 5, read_s=0.0), SlowClassifier(clock, predict_s=2.0), total=40, clock=clock
    )
    assert stats.wait_fraction == 0.0
    assert stats.computed_s == pytest.approx(stats.total_s) == pytest.approx(10.0)


def test_progress_reports_count_neither_as_waiting_nor_as_classifying() -> None:
    clock = FakeClock()
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        clock.now += 0.5  # e.g. a vendor progress update over the network

    _, stats = classify_batches(
        _batches(clock, [3, 3], read_s=1.0), SlowClassifier(clock, 1.0), total=6, progress=progress, clock=clock
    )
    assert calls == [(0, 6), (3, 6), (6, 6)]
    assert stats.reported_s == pytest.approx(1.5)
    assert (stats.waited_s, stats.computed_s, stats.total_s) == pytest.approx((2.0, 2.0, 5.5))


def test_no_tiles_means_no_wait() -> None:
    clock = FakeClock()
    probabilities, stats = classify_batches(iter([]), SlowClassifier(clock, 1.0), total=0, clock=clock)
    assert probabilities.shape == (0, 2)
    assert (stats.tiles, stats.total_s, stats.wait_fraction) == (0, 0.0, 0.0)
    assert ClassifyStats().wait_fraction == 0.0


def test_a_failing_classifier_closes_the_tile_reader_at_once() -> None:
    clock = FakeClock()
    closed: list[bool] = []

    class Broken(SlowClassifier):
        def predict(self, batch: NDArray[np.uint8]) -> NDArray[np.float32]:
            raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        classify_batches(_batches(clock, [2, 2], 1.0, closed=closed), Broken(clock, 0.0), total=4, clock=clock)
    assert closed == [True]  # the reader's clean-up (stopping its workers) ran before the error left


def test_timings_name_the_sub_stages_of_analyse() -> None:
    timings = AnalysisTimings(tissue_s=1.23456, regions_s=0.5, classify=ClassifyStats(total_s=7.0))
    assert timings.seconds() == {"tissue": 1.235, "tiles_classify": 7.0, "regions": 0.5}


def test_timed_analysis_is_the_same_analysis_with_its_time_split(
    small_tiff_slide: Path, small_tiff_analysis: SlideAnalysis
) -> None:
    analysis, timings = analyze_slide_timed(
        small_tiff_slide, get_classifier("he-tissue", "1.0.0"), tile_workers=0, batch_size=16
    )
    assert analysis.model_dump() == small_tiff_analysis.model_dump()
    stats = timings.classify
    assert stats.tiles == len(analysis.tiles)
    assert stats.batches == -(-len(analysis.tiles) // 16)
    assert timings.tissue_s > 0 and timings.regions_s > 0
    # Read in this process, so the classifier waits for every batch: the reading is all waiting.
    assert 0.0 < stats.wait_fraction < 1.0
    assert stats.waited_s + stats.computed_s + stats.reported_s <= stats.total_s


def test_bench_lists_the_issue_stages_in_order() -> None:
    metrics = {
        "seconds": {"download": 4.0, "open": 1.0, "analyse": 10.0, "artifacts": 2.0, "delivery": 0.5},
        "analyse_seconds": {"tissue": 3.0, "tiles_classify": 6.5, "regions": 0.5},
    }
    assert list(stage_seconds(metrics).items()) == [
        ("download", 4.0),
        ("open", 1.0),
        ("tissue", 3.0),
        ("tiles + classify", 6.5),
        ("regions", 0.5),
        ("artifacts", 2.0),
        ("delivery", 0.5),
    ]
    # A line from before the split keeps analyse whole.
    del metrics["analyse_seconds"]
    assert list(stage_seconds(metrics)) == ["download", "open", "analyse", "artifacts", "delivery"]
