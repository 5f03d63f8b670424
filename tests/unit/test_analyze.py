"""analyze_slide end to end on generated slides, checked against what the generator painted."""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.measure import points_in_poly

from batch_job.analyze import analyze_slide, class_polygons
from batch_job.classifiers import Classifier, get_classifier
from batch_job.slide import TileSpec, detect_tissue, open_slide, prepare_slide, tile_grid
from batch_job.tiles import read_tiles
from local.synthetic import SyntheticTissue, write_synthetic_slide
from slidebridge.analysis import SlideAnalysis
from slidebridge.errors import UnreadableSlideError


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return get_classifier("he-tissue", "1.0.0", device="cpu")


@pytest.fixture(scope="module")
def analysis(small_tiff_analysis: SlideAnalysis) -> SlideAnalysis:
    return small_tiff_analysis


def test_worker_processes_give_the_same_result_as_in_process(
    small_tiff_slide: Path, classifier: Classifier, analysis: SlideAnalysis
):
    with_workers = analyze_slide(small_tiff_slide, classifier, tile_workers=2, batch_size=16)
    assert with_workers.model_dump() == analysis.model_dump()


def test_slide_facts_and_tile_grid(analysis: SlideAnalysis):
    assert (analysis.slide_width, analysis.slide_height) == (8192, 6144)
    assert (analysis.mpp_x, analysis.mpp_y) == (0.5, 0.5)
    assert (analysis.application_id, analysis.application_version) == ("he-tissue", "1.0.0")
    assert (analysis.classifier_tile_px, analysis.classifier_mpp) == (224, 1.0)
    assert (analysis.tile_width, analysis.tile_height, analysis.read_level) == (448, 448, 0)
    assert len(analysis.tiles) > 50
    for tile in analysis.tiles:
        assert tile.x % 448 == 0
        assert tile.y % 448 == 0
        assert tile.x + tile.width <= 8192
        assert tile.y + tile.height <= 6144
        assert tile.label == analysis.class_names[int(np.argmax(tile.probabilities))]


def test_tiles_get_the_class_that_was_painted(analysis: SlideAnalysis, small_tiff_truth: SyntheticTissue):
    step = 8  # level-0 px per truth pixel
    painted_tissue, painted_cellular = small_tiff_truth.tissue_truth(step), small_tiff_truth.cellular_truth(step)
    stroma_labels, dense_labels = [], []
    for tile in analysis.tiles:
        window = np.s_[tile.y // step : (tile.y + tile.height) // step, tile.x // step : (tile.x + tile.width) // step]
        tissue, cellular = painted_tissue[window].mean(), painted_cellular[window].mean()
        if tissue >= 0.6 and cellular == 0:
            stroma_labels.append(tile.label)
        elif tissue >= 0.6 and cellular >= 0.8 * tissue:
            dense_labels.append(tile.label)
    assert len(stroma_labels) >= 10
    assert len(dense_labels) >= 5
    assert stroma_labels.count("tissue") >= 0.9 * len(stroma_labels)
    assert dense_labels.count("cellular") >= 0.9 * len(dense_labels)


def test_summary_figures(analysis: SlideAnalysis, small_tiff_truth: SyntheticTissue):
    summary = analysis.summary
    assert summary.tile_count == len(analysis.tiles)
    assert sum(summary.tile_counts.values()) == summary.tile_count
    assert sum(summary.class_fractions.values()) == pytest.approx(1.0)
    assert set(summary.tissue_class_fractions) == {"tissue", "cellular"}
    assert sum(summary.tissue_class_fractions.values()) == pytest.approx(1.0)
    assert summary.analysed_area_mm2 == pytest.approx(8192 * 6144 * 0.25 / 1e6)
    painted_mm2 = small_tiff_truth.tissue_truth(8).sum() * (8 * 0.5 / 1000) ** 2
    assert summary.tissue_area_mm2 == pytest.approx(painted_mm2, rel=0.1)
    tile_area = {name: 0.0 for name in analysis.class_names}
    for tile in analysis.tiles:
        tile_area[tile.label] += tile.width * tile.height * 0.25 / 1e6
    assert summary.class_areas_mm2 == pytest.approx(tile_area)


def test_region_polygons_enclose_exactly_their_class_tiles(analysis: SlideAnalysis):
    for region in analysis.regions:
        assert region.color == analysis.color_of(region.label)
        assert region.tile_count == sum(tile.label == region.label for tile in analysis.tiles)
        assert sum(p.area_mm2 for p in region.polygons) == pytest.approx(region.area_mm2)
        for tile in analysis.tiles:
            centre = np.array([[tile.x + tile.width / 2, tile.y + tile.height / 2]])
            inside = sum(
                bool(points_in_poly(centre, np.array(p.exterior))[0])
                and not any(points_in_poly(centre, np.array(h))[0] for h in p.holes)
                for p in region.polygons
            )
            assert inside == (1 if tile.label == region.label else 0), (region.label, tile)
    assert {r.label for r in analysis.foreground_regions()} == {"tissue", "cellular"}


def test_class_polygons_merge_tiles_and_keep_holes():
    grid = np.zeros((6, 6), dtype=bool)
    grid[0:3, 0:3] = True
    grid[1, 1] = False  # a ring of 8 tiles around a hole
    grid[4, 4] = grid[5, 5] = True  # touching only at a corner: two separate polygons
    polygons = class_polygons(grid, (100, 100), (600, 600))
    assert len(polygons) == 3
    ring = next(p for p in polygons if p.tiles.sum() == 8)
    exterior, holes = ring.exterior, ring.holes
    assert exterior[0] == exterior[-1]
    assert len(holes) == 1
    centre_of_missing_tile = np.array([[150.0, 150.0]])
    assert points_in_poly(centre_of_missing_tile, np.array(exterior))[0]
    assert points_in_poly(centre_of_missing_tile, np.array(holes[0]))[0]
    # Outlines run along tile edges: the ring's exterior spans 0..300 px in x and y.
    xs, ys = [p[0] for p in exterior], [p[1] for p in exterior]
    assert (min(xs), max(xs), min(ys), max(ys)) == (0, 300, 0, 300)
    # GeoJSON orientation: exterior counter-clockwise (positive area), hole clockwise.
    area = 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(exterior))
    hole_area = 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(holes[0]))
    assert area > 0 > hole_area
    assert area == pytest.approx(9 * 100 * 100, rel=0.02)  # corners cut by an eighth of a tile


def test_regions_restrict_the_analysis(small_tiff_slide: Path, classifier: Classifier, analysis: SlideAnalysis):
    left_half = [(0.0, 0.0), (4096.0, 0.0), (4096.0, 6144.0), (0.0, 6144.0)]
    restricted = analyze_slide(small_tiff_slide, classifier, tile_workers=0, batch_size=16, regions=[left_half])
    expected = [tile for tile in analysis.tiles if tile.x + tile.width / 2 < 4096]
    assert 0 < len(restricted.tiles) < len(analysis.tiles)
    assert restricted.tiles == expected
    assert restricted.summary.analysed_area_mm2 == pytest.approx(analysis.summary.analysed_area_mm2 / 2, rel=0.02)
    assert restricted.summary.tissue_area_mm2 < analysis.summary.tissue_area_mm2


def test_progress_is_reported_from_zero_to_all(small_tiff_slide: Path, classifier: Classifier):
    calls: list[tuple[int, int]] = []
    result = analyze_slide(
        small_tiff_slide,
        classifier,
        tile_workers=0,
        batch_size=32,
        progress=lambda done, total: calls.append((done, total)),
    )
    total = len(result.tiles)
    assert calls[0] == (0, total)
    assert calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert len(calls) == 1 + -(-total // 32)


def test_dicom_series_gives_the_same_labels_as_the_tiff_of_the_same_slide(
    small_dicom_slide: list[Path], classifier: Classifier, tmp_path: Path
):
    tiff = write_synthetic_slide(tmp_path / "same.svs", 2048, 1536, seed=5, mpp=0.5)
    from_tiff = analyze_slide(tiff, classifier, tile_workers=0, batch_size=16)
    from_dicom = analyze_slide(
        prepare_slide(small_dicom_slide, tmp_path / "dicom"), classifier, tile_workers=0, batch_size=16
    )
    assert len(from_tiff.tiles) >= 5
    assert [(t.x, t.y) for t in from_dicom.tiles] == [(t.x, t.y) for t in from_tiff.tiles]
    agree = sum(a.label == b.label for a, b in zip(from_dicom.tiles, from_tiff.tiles, strict=True))
    assert agree >= 0.9 * len(from_tiff.tiles)


def test_a_slide_without_tissue_gives_an_empty_analysis(tmp_path: Path, classifier: Classifier):
    path = tmp_path / "blank.svs"
    tifffile.imwrite(
        path,
        np.full((1024, 1024, 3), 244, np.uint8),
        tile=(256, 256),
        photometric="rgb",
        description="Aperio Image Library v12.0.15 \r\n1024x1024|AppMag = 20|MPP = 0.5",
        metadata=None,
    )
    result = analyze_slide(path, classifier, tile_workers=2, batch_size=16)
    assert result.tiles == []
    assert result.summary.tile_count == 0
    assert result.summary.tissue_area_mm2 == 0
    assert all(region.polygons == [] for region in result.regions)


# --- the tile reader ---------------------------------------------------------------------------------


def _specs(small_tiff_slide: Path) -> list[TileSpec]:
    with open_slide(small_tiff_slide) as slide:
        return tile_grid(slide, detect_tissue(slide), tile_px=224, target_mpp=1.0, min_tissue_fraction=0.1)


def test_tile_reader_keeps_order_and_resizes(small_tiff_slide: Path):
    specs = _specs(small_tiff_slide)[:20]
    batches = list(read_tiles(small_tiff_slide, specs, tile_px=224, batch_size=6, workers=2, max_pending=1))
    assert [len(batch) for batch, _ in batches] == [6, 6, 6, 2]
    assert [spec for batch, _ in batches for spec in batch] == specs
    assert all(pixels.shape == (len(batch), 224, 224, 3) and pixels.dtype == np.uint8 for batch, pixels in batches)
    assert not multiprocessing.active_children()  # the pool is gone once the reader is exhausted


def test_tile_reader_stops_its_workers_when_abandoned_or_failing(small_tiff_slide: Path):
    specs = _specs(small_tiff_slide)[:12]
    reader = read_tiles(small_tiff_slide, specs, tile_px=224, batch_size=2, workers=2)
    next(reader)
    reader.close()  # the caller gave up after one batch
    assert not multiprocessing.active_children()

    broken = [*specs[:4], dataclasses.replace(specs[4], read_width=-1)]
    with pytest.raises(UnreadableSlideError, match="cannot read the slide"):
        list(read_tiles(small_tiff_slide, broken, tile_px=224, batch_size=2, workers=2))
    assert not multiprocessing.active_children()
