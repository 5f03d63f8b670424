"""SlideAnalysis: the vendor-neutral output of a classifier run on one slide (DESIGN §5).

Every destination renders this one model in its own terms (Platform artifacts, Sectra primitives,
Techcyte GeoJSON), so it holds plain data only: no numpy types, no torch, no openslide.

Coordinates are level-0 (full-resolution) pixels of the slide, origin at the top-left corner, x to
the right, y down. Physical sizes use the slide's resolution ``mpp_x``/``mpp_y`` in µm per level-0
pixel; areas are in mm².
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

RGB = tuple[int, int, int]
# A point (x, y) in level-0 px.
Point = tuple[float, float]
# A closed ring: first point == last point, at least 4 points.
Ring = list[Point]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TileResult(_Frozen):
    """One classified tile: its level-0 rectangle (clipped to the slide) and class probabilities."""

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    # One probability per class, in the order of ``SlideAnalysis.class_names``.
    probabilities: list[float]
    label: str  # the most probable class
    # Share of the tile covered by detected tissue (from the low-resolution tissue mask).
    tissue_fraction: float = Field(ge=0.0, le=1.0)


class RegionPolygon(_Frozen):
    """A polygon in level-0 px: exterior ring plus holes, rings closed.

    Orientation follows GeoJSON (RFC 7946 §3.1.6) in the (x, y) plane: exterior counter-clockwise,
    holes clockwise. With y pointing down, that is clockwise on screen for the exterior.
    """

    exterior: Ring
    holes: list[Ring] = []
    area_mm2: float = Field(ge=0.0)

    @model_validator(mode="after")
    def _closed(self) -> Self:
        for ring in [self.exterior, *self.holes]:
            if len(ring) < 4 or ring[0] != ring[-1]:
                raise ValueError("polygon rings must be closed and have at least 4 points")
        return self

    def bbox(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) in level-0 px (GeoJSON order)."""
        xs = [p[0] for p in self.exterior]
        ys = [p[1] for p in self.exterior]
        return min(xs), min(ys), max(xs), max(ys)


class ClassRegion(_Frozen):
    """All tiles predicted as one class, merged into polygons."""

    label: str
    color: RGB
    polygons: list[RegionPolygon]
    tile_count: int = Field(ge=0)
    area_mm2: float = Field(ge=0.0)  # area of the class's tiles (clipped to the slide)


class AnalysisSummary(_Frozen):
    """Headline figures for viewers and reports."""

    tile_count: int = Field(ge=0)
    tile_counts: dict[str, int]  # per class
    # Share of the analysed tiles per class (sums to 1 when there are tiles).
    class_fractions: dict[str, float]
    # Share per class among the tiles that are not background (what "Tissue 62 % · cellular 18 %"
    # reports); empty when the classifier has no background class or no tile is tissue.
    tissue_class_fractions: dict[str, float]
    class_areas_mm2: dict[str, float]
    # Detected tissue (low-resolution mask) inside the analysed area, whatever the tiles say.
    tissue_area_mm2: float = Field(ge=0.0)
    analysed_area_mm2: float = Field(ge=0.0)  # the whole slide, or the requested regions


class SlideAnalysis(_Frozen):
    """A classifier's result on one slide."""

    application_id: str
    application_version: str
    slide_width: int = Field(gt=0)  # level-0 px
    slide_height: int = Field(gt=0)
    mpp_x: float = Field(gt=0.0)  # µm per level-0 px
    mpp_y: float = Field(gt=0.0)
    class_names: list[str]
    class_colors: list[RGB]
    background_class: str | None = None
    # The tile grid: tiles of ``classifier_tile_px`` px at ``classifier_mpp`` µm/px, i.e. of
    # ``tile_width`` × ``tile_height`` level-0 px, read from pyramid level ``read_level`` as
    # ``read_width`` × ``read_height`` px of that level and resized to the classifier's size.
    classifier_tile_px: int = Field(gt=0)
    classifier_mpp: float = Field(gt=0.0)
    tile_width: int = Field(gt=0)
    tile_height: int = Field(gt=0)
    read_level: int = Field(ge=0)
    read_width: int = Field(gt=0)
    read_height: int = Field(gt=0)
    tiles: list[TileResult]
    regions: list[ClassRegion]
    summary: AnalysisSummary

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(self.class_names) != len(self.class_colors) or len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be unique and match class_colors one to one")
        if self.background_class is not None and self.background_class not in self.class_names:
            raise ValueError(f"background_class {self.background_class!r} is not a class")
        known = set(self.class_names)
        for tile in self.tiles:
            if len(tile.probabilities) != len(self.class_names) or tile.label not in known:
                raise ValueError("every tile needs one probability per class and a known label")
        return self

    def color_of(self, label: str) -> RGB:
        return self.class_colors[self.class_names.index(label)]

    def foreground_regions(self) -> list[ClassRegion]:
        """The class regions worth drawing: every class but the background."""
        return [region for region in self.regions if region.label != self.background_class]
