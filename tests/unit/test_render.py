"""The four Platform artifacts rendered from an analysis of a generated slide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from batch_job.analyze import analyze_slide
from batch_job.classifiers import get_classifier
from batch_job.render import HEATMAP_MAX_PX, RenderedArtifact, write_artifacts
from batch_job.slide import open_slide
from slidebridge.analysis import SlideAnalysis


@pytest.fixture(scope="module")
def rendered(
    small_tiff_slide: Path, small_tiff_analysis: SlideAnalysis, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SlideAnalysis, dict[str, RenderedArtifact]]:
    with open_slide(small_tiff_slide) as slide:
        artifacts = write_artifacts(small_tiff_analysis, slide, tmp_path_factory.mktemp("out"))
    return small_tiff_analysis, {artifact.name: artifact for artifact in artifacts}


def test_artifact_names_and_media_types(rendered: tuple[SlideAnalysis, dict[str, RenderedArtifact]]):
    _, artifacts = rendered
    assert {name: a.media_type for name, a in artifacts.items()} == {
        "tissue:geojson": "application/geo+json",
        "tiles:csv": "text/csv",
        "heatmap:png": "image/png",
        "summary:json": "application/json",
    }
    assert all(a.path.is_file() and a.path.stat().st_size > 0 for a in artifacts.values())


def test_geojson_is_a_valid_feature_collection_of_class_polygons(
    rendered: tuple[SlideAnalysis, dict[str, RenderedArtifact]],
):
    analysis, artifacts = rendered
    document = json.loads(artifacts["tissue:geojson"].path.read_text())
    assert document["type"] == "FeatureCollection"
    assert document["features"]
    area_by_class: dict[str, float] = {}
    for feature in document["features"]:
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        properties = feature["properties"]
        assert properties["class"] in {"tissue", "cellular"}  # the background is not a region
        assert properties["color"] == "#{:02X}{:02X}{:02X}".format(*analysis.color_of(properties["class"]))
        assert properties["area_mm2"] > 0
        area_by_class[properties["class"]] = area_by_class.get(properties["class"], 0.0) + properties["area_mm2"]
        for ring in feature["geometry"]["coordinates"]:
            assert len(ring) >= 4
            assert ring[0] == ring[-1]
            for x, y in ring:
                assert 0 <= x <= analysis.slide_width
                assert 0 <= y <= analysis.slide_height
        x_min, y_min, x_max, y_max = feature["bbox"]
        exterior = np.array(feature["geometry"]["coordinates"][0])
        assert (x_min, y_min, x_max, y_max) == (*exterior.min(axis=0), *exterior.max(axis=0))
    for name, area in area_by_class.items():
        assert area == pytest.approx(analysis.summary.class_areas_mm2[name], rel=1e-4)


def test_tiles_csv_has_one_row_per_tile(rendered: tuple[SlideAnalysis, dict[str, RenderedArtifact]]):
    analysis, artifacts = rendered
    with artifacts["tiles:csv"].path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["x", "y", "width", "height", "background", "tissue", "cellular", "class"]
    assert len(rows) == len(analysis.tiles)
    for row, tile in zip(rows, analysis.tiles, strict=True):
        assert (int(row["x"]), int(row["y"]), int(row["width"]), int(row["height"])) == (
            tile.x,
            tile.y,
            tile.width,
            tile.height,
        )
        probabilities = [float(row[name]) for name in analysis.class_names]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)
        assert row["class"] == analysis.class_names[int(np.argmax(probabilities))] == tile.label


def test_heatmap_is_the_thumbnail_with_class_colours(rendered: tuple[SlideAnalysis, dict[str, RenderedArtifact]]):
    analysis, artifacts = rendered
    with Image.open(artifacts["heatmap:png"].path) as image:
        assert image.format == "PNG"
        assert image.size == (HEATMAP_MAX_PX, HEATMAP_MAX_PX * 6144 // 8192)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    scale = image.size[0] / analysis.slide_width
    for tile in analysis.tiles[::5]:
        cx, cy = int((tile.x + tile.width / 2) * scale), int((tile.y + tile.height / 2) * scale)
        if cx < 300 and cy < 150:
            continue  # under the legend
        r, g, b = pixels[cy - 3 : cy + 4, cx - 3 : cx + 4].reshape(-1, 3).mean(axis=0)
        if tile.label == "cellular":  # drawn red
            assert r > g + 40, (tile, (r, g, b))
        elif tile.label == "tissue":  # drawn green over pink: green is no longer the weakest channel
            assert g > b - 10, (tile, (r, g, b))


def test_summary_json_carries_the_figures(rendered: tuple[SlideAnalysis, dict[str, RenderedArtifact]]):
    analysis, artifacts = rendered
    summary = json.loads(artifacts["summary:json"].path.read_text())
    assert summary["application_id"] == "he-tissue"
    assert summary["application_version"] == "1.0.0"
    assert summary["slide"] == {"width_px": 8192, "height_px": 6144, "mpp_x": 0.5, "mpp_y": 0.5}
    assert summary["tile_count"] == len(analysis.tiles)
    assert summary["tile_counts"] == analysis.summary.tile_counts
    assert summary["tissue_area_mm2"] == pytest.approx(analysis.summary.tissue_area_mm2)
    assert summary["class_fractions"] == pytest.approx(analysis.summary.class_fractions)
    assert [c["name"] for c in summary["classes"]] == ["background", "tissue", "cellular"]


def test_a_slide_without_tissue_still_gets_all_artifacts(tmp_path: Path):
    path = tmp_path / "blank.svs"
    tifffile.imwrite(
        path,
        np.full((1024, 768, 3), 244, np.uint8),
        tile=(256, 256),
        photometric="rgb",
        description="Aperio Image Library v12.0.15 \r\n768x1024|AppMag = 20|MPP = 0.5",
        metadata=None,
    )
    analysis = analyze_slide(path, get_classifier("he-tissue", "1.0.0"), tile_workers=0, batch_size=8)
    with open_slide(path) as slide:
        artifacts = {a.name: a for a in write_artifacts(analysis, slide, tmp_path / "out")}
    assert json.loads(artifacts["tissue:geojson"].path.read_text())["features"] == []
    assert artifacts["tiles:csv"].path.read_text().splitlines() == ["x,y,width,height,background,tissue,cellular,class"]
    assert json.loads(artifacts["summary:json"].path.read_text())["tile_count"] == 0
    with Image.open(artifacts["heatmap:png"].path) as image:
        assert image.size == (768, 1024)
