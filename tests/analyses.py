"""A hand-made SlideAnalysis for vendor result builders' tests (no slide, no classifier)."""

from __future__ import annotations

from slidebridge.analysis import AnalysisSummary, ClassRegion, RegionPolygon, SlideAnalysis, TileResult

# A non-square slide: 8000 × 3000 level-0 px at 0.5 µm/px, so H/W = 0.375 (y never reaches 1).
W, H, MPP = 8000, 3000, 0.5
TILE = 448  # level-0 px: 224 classifier px at 1.0 µm/px
CLASSES = ["background", "tissue", "cellular"]
COLORS = [(255, 255, 255), (31, 119, 180), (214, 39, 40)]


def ring(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    """Closed exterior ring of an axis-aligned rectangle in level-0 px."""
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]


def make_analysis(
    *,
    tiles: list[TileResult] | None = None,
    regions: list[ClassRegion] | None = None,
    fractions: dict[str, float] | None = None,
) -> SlideAnalysis:
    if tiles is None:
        tiles = []
        for row in range(H // TILE):
            for col in range(W // TILE):
                label = CLASSES[(row + col) % 3]
                p = [0.1, 0.1, 0.1]
                p[CLASSES.index(label)] = 0.5 + 0.01 * ((row * 7 + col) % 40)  # distinct confidences
                tiles.append(
                    TileResult(
                        x=col * TILE,
                        y=row * TILE,
                        width=TILE,
                        height=TILE,
                        probabilities=p,
                        label=label,
                        tissue_fraction=1.0,
                    )
                )
    if regions is None:
        regions = [
            ClassRegion(label="background", color=COLORS[0], polygons=[], tile_count=0, area_mm2=0.0),
            ClassRegion(
                label="tissue",
                color=COLORS[1],
                polygons=[
                    RegionPolygon(
                        exterior=ring(800, 400, 4800, 2800), holes=[ring(1200, 800, 1600, 1200)[::-1]], area_mm2=2.3
                    ),
                    RegionPolygon(exterior=ring(6000, 200, 6400, 600), area_mm2=0.04),
                ],
                tile_count=10,
                area_mm2=2.34,
            ),
            ClassRegion(
                label="cellular",
                color=COLORS[2],
                polygons=[RegionPolygon(exterior=ring(5200, 1200, 7600, 2900), area_mm2=1.0)],
                tile_count=5,
                area_mm2=1.0,
            ),
        ]
    fractions = {"tissue": 0.82, "cellular": 0.18} if fractions is None else fractions
    return SlideAnalysis(
        application_id="he-tissue",
        application_version="1.0.0",
        slide_width=W,
        slide_height=H,
        mpp_x=MPP,
        mpp_y=MPP,
        class_names=CLASSES,
        class_colors=COLORS,
        background_class="background",
        classifier_tile_px=224,
        classifier_mpp=1.0,
        tile_width=TILE,
        tile_height=TILE,
        read_level=0,
        read_width=TILE,
        read_height=TILE,
        tiles=tiles,
        regions=regions,
        summary=AnalysisSummary(
            tile_count=len(tiles),
            tile_counts={c: sum(t.label == c for t in tiles) for c in CLASSES},
            class_fractions={"background": 0.5, "tissue": 0.41, "cellular": 0.09},
            tissue_class_fractions=fractions,
            class_areas_mm2={"background": 3.0, "tissue": 2.34, "cellular": 1.0},
            tissue_area_mm2=3.3412,
            analysed_area_mm2=6.0,
        ),
    )
