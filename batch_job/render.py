"""The Platform API's output artifacts for one analysed slide (DESIGN §5).

- ``tissue:geojson``: class regions as a GeoJSON FeatureCollection in level-0 px (every class but
  the background; one Polygon feature per region, with QuPath-style ``classification`` properties);
- ``tiles:csv``: one row per classified tile, level-0 rectangle, probability per class, label;
- ``heatmap:png``: the slide thumbnail (≤ 2048 px) with the classes overlaid and a legend;
- ``summary:json``: the summary figures with the application and slide facts.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import openslide
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict

from batch_job.slide import read_downsampled
from slidebridge.analysis import SlideAnalysis

HEATMAP_MAX_PX = 2048
_OVERLAY_ALPHA = 90  # of 255: the tissue stays visible under the class colours


class RenderedArtifact(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str  # the Platform API artifact name, e.g. "tissue:geojson"
    path: Path
    media_type: str


def write_artifacts(analysis: SlideAnalysis, slide: openslide.OpenSlide, out_dir: Path) -> list[RenderedArtifact]:
    """Write the four artifacts into ``out_dir``; return them in a fixed order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _write_geojson(analysis, out_dir / "tissue.geojson"),
        _write_tiles_csv(analysis, out_dir / "tiles.csv"),
        _write_heatmap(analysis, slide, out_dir / "heatmap.png"),
        _write_summary(analysis, out_dir / "summary.json"),
    ]


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02X}{:02X}{:02X}".format(*color)


def geojson(analysis: SlideAnalysis) -> dict[str, Any]:
    """The class regions as a GeoJSON FeatureCollection (coordinates: level-0 px [x, y])."""
    features = []
    for region in analysis.foreground_regions():
        for polygon in region.polygons:
            rings = [polygon.exterior, *polygon.holes]
            features.append(
                {
                    "type": "Feature",
                    "bbox": list(polygon.bbox()),
                    "geometry": {"type": "Polygon", "coordinates": [[[x, y] for x, y in ring] for ring in rings]},
                    "properties": {
                        "class": region.label,
                        "color": _hex(region.color),
                        "area_mm2": round(polygon.area_mm2, 6),
                        # QuPath reads these when importing GeoJSON.
                        "objectType": "annotation",
                        "classification": {"name": region.label, "color": list(region.color)},
                    },
                }
            )
    return {
        "type": "FeatureCollection",
        "properties": {
            "application_id": analysis.application_id,
            "application_version": analysis.application_version,
            "coordinate_system": "level-0 pixels, origin top-left, x right, y down",
            "slide_width": analysis.slide_width,
            "slide_height": analysis.slide_height,
            "mpp_x": analysis.mpp_x,
            "mpp_y": analysis.mpp_y,
        },
        "features": features,
    }


def _write_geojson(analysis: SlideAnalysis, path: Path) -> RenderedArtifact:
    path.write_text(json.dumps(geojson(analysis), separators=(",", ":")), encoding="utf-8")
    return RenderedArtifact(name="tissue:geojson", path=path, media_type="application/geo+json")


def _write_tiles_csv(analysis: SlideAnalysis, path: Path) -> RenderedArtifact:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["x", "y", "width", "height", *analysis.class_names, "class"])
        for tile in analysis.tiles:
            writer.writerow(
                [tile.x, tile.y, tile.width, tile.height, *(f"{p:.4f}" for p in tile.probabilities), tile.label]
            )
    return RenderedArtifact(name="tiles:csv", path=path, media_type="text/csv")


def summary_document(analysis: SlideAnalysis) -> dict[str, Any]:
    """What ``summary:json`` holds."""
    return {
        "application_id": analysis.application_id,
        "application_version": analysis.application_version,
        "slide": {
            "width_px": analysis.slide_width,
            "height_px": analysis.slide_height,
            "mpp_x": analysis.mpp_x,
            "mpp_y": analysis.mpp_y,
        },
        "tiles": {
            "classifier_tile_px": analysis.classifier_tile_px,
            "classifier_mpp": analysis.classifier_mpp,
            "width_px": analysis.tile_width,
            "height_px": analysis.tile_height,
            "read_level": analysis.read_level,
        },
        "classes": [
            {"name": name, "color": _hex(color)}
            for name, color in zip(analysis.class_names, analysis.class_colors, strict=True)
        ],
        **analysis.summary.model_dump(),
        "region_count": sum(len(region.polygons) for region in analysis.foreground_regions()),
    }


def _write_summary(analysis: SlideAnalysis, path: Path) -> RenderedArtifact:
    path.write_text(json.dumps(summary_document(analysis), indent=2), encoding="utf-8")
    return RenderedArtifact(name="summary:json", path=path, media_type="application/json")


def _write_heatmap(analysis: SlideAnalysis, slide: openslide.OpenSlide, path: Path) -> RenderedArtifact:
    width, height = analysis.slide_width, analysis.slide_height
    downsample = max(width, height) / HEATMAP_MAX_PX if max(width, height) > HEATMAP_MAX_PX else 1.0
    thumbnail = Image.fromarray(read_downsampled(slide, downsample)).convert("RGBA")
    overlay = Image.new("RGBA", thumbnail.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)

    def to_thumb(x: float, y: float) -> tuple[float, float]:  # level-0 px → thumbnail px
        return x / downsample, y / downsample

    for tile in analysis.tiles:
        if tile.label == analysis.background_class:
            continue
        x0, y0 = to_thumb(tile.x, tile.y)
        x1, y1 = to_thumb(tile.x + tile.width, tile.y + tile.height)
        draw.rectangle(
            [x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], fill=(*analysis.color_of(tile.label), _OVERLAY_ALPHA)
        )
    for region in analysis.foreground_regions():
        for polygon in region.polygons:
            for ring in [polygon.exterior, *polygon.holes]:
                draw.line([to_thumb(x, y) for x, y in ring], fill=(*region.color, 255), width=2)
    image = Image.alpha_composite(thumbnail, overlay)
    _draw_legend(image, analysis)
    # No ``optimize``: its exhaustive search took 2.3 s of a 2048 px heatmap for 6 % fewer bytes.
    image.convert("RGB").save(path, format="PNG")
    return RenderedArtifact(name="heatmap:png", path=path, media_type="image/png")


def _draw_legend(image: Image.Image, analysis: SlideAnalysis) -> None:
    """A small box in the top-left corner: one swatch per drawn class with its share of the tiles."""
    size = max(11, min(image.size) // 45)
    font = ImageFont.load_default(size=size)
    fractions = analysis.summary.tissue_class_fractions or analysis.summary.class_fractions
    rows = [
        (name, color, f"{name} {100.0 * fractions.get(name, 0.0):.0f} %")
        for name, color in zip(analysis.class_names, analysis.class_colors, strict=True)
        if name != analysis.background_class
    ]
    draw = ImageDraw.Draw(image)
    pad, line = size // 2, int(size * 1.5)
    text_w = max((draw.textlength(text, font=font) for _, _, text in rows), default=0.0)
    box = (pad, pad, int(pad * 4 + size + text_w), pad * 3 + line * len(rows))
    draw.rectangle(box, fill=(255, 255, 255, 220), outline=(90, 90, 90, 255))
    for i, (_, color, text) in enumerate(rows):
        top = pad * 2 + i * line
        draw.rectangle([pad * 2, top, pad * 2 + size, top + size], fill=(*color, 255), outline=(60, 60, 60, 255))
        draw.text((pad * 3 + size, top - size // 8), text, fill=(20, 20, 20, 255), font=font)
