"""One slide through the classifier: tissue → tile grid → batched classification → SlideAnalysis.

Frames and units as in ``batch_job.slide``: level-0 px (origin top-left, x right, y down), µm/px,
mm². The *grid* frame indexes tiles by (row, col); tile (row, col) covers level-0
``[col·tile_width, (col+1)·tile_width) × [row·tile_height, (row+1)·tile_height)``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from skimage.draw import polygon2mask
from skimage.measure import approximate_polygon, find_contours, label, points_in_poly, regionprops

from batch_job.classifiers import Classifier
from batch_job.slide import TileSpec, TissueMask, detect_tissue, open_slide, slide_mpp, tile_geometry, tile_grid
from batch_job.tiles import Batch, read_tiles
from slidebridge.analysis import AnalysisSummary, ClassRegion, RegionPolygon, SlideAnalysis, TileResult

logger = logging.getLogger(__name__)

# Tiles with less detected tissue than this are not classified at all.
MIN_TISSUE_FRACTION = 0.1
_LOG_EVERY_S = 5.0
# Region outlines are traced on the tile grid refined this many times, so a corner is cut by
# 1/(2·refine) of a tile (see ``class_polygons``).
_REFINE = 4

Polygon = list[tuple[float, float]]  # level-0 px (x, y)
Ring = list[tuple[float, float]]  # a closed polygon ring in level-0 px (x, y)


@dataclass
class ClassifyStats:
    """Where the time of the tiles + classify stage went, seen from the classifier's side.

    ``waited_s`` is the time the classifier stood idle for its next batch: reading and decoding that
    the worker processes did not hide behind the previous batch's classification. With reading and
    classifying overlapped it is near zero; read in process (``tile_workers=0``) it is all the reading.
    """

    tiles: int = 0
    batches: int = 0
    waited_s: float = 0.0  # waiting for the next batch of tiles
    computed_s: float = 0.0  # in ``classifier.predict``
    reported_s: float = 0.0  # in the progress callback (a vendor progress update may be a network call)
    total_s: float = 0.0  # the whole stage: the above plus starting and stopping the tile reader

    @property
    def wait_fraction(self) -> float:
        """Share of the stage the classifier waited for tiles (0 for a stage that took no time)."""
        return self.waited_s / self.total_s if self.total_s > 0 else 0.0


@dataclass
class AnalysisTimings:
    """Seconds of the sub-stages of ``analyze_slide``; together they make up its whole time."""

    tissue_s: float = 0.0  # open the slide, detect tissue, lay the tile grid (and apply the regions)
    regions_s: float = 0.0  # per-tile results, class polygons and the summary
    classify: ClassifyStats = field(default_factory=ClassifyStats)  # tiles + classify

    def seconds(self) -> dict[str, float]:
        """The sub-stages in the order they run, as the ``item metrics`` line reports them."""
        return {
            "tissue": round(self.tissue_s, 3),
            "tiles_classify": round(self.classify.total_s, 3),
            "regions": round(self.regions_s, 3),
        }


class TimedAnalysis(NamedTuple):
    analysis: SlideAnalysis
    timings: AnalysisTimings


def analyze_slide(
    slide_path: Path,
    classifier: Classifier,
    *,
    tile_workers: int,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    regions: list[Polygon] | None = None,
    min_tissue_fraction: float = MIN_TISSUE_FRACTION,
) -> SlideAnalysis:
    """Classify the tissue of one slide.

    ``regions``: optional polygons in level-0 px; only tiles whose centre lies inside one of them
    are analysed (Sectra's taggedPolygon/multiArea inputs). ``progress(done, total)`` is called
    with tile counts before the first batch and after each. ``tile_workers`` worker processes read
    tiles (0: in this process).
    """
    return analyze_slide_timed(
        slide_path,
        classifier,
        tile_workers=tile_workers,
        batch_size=batch_size,
        progress=progress,
        regions=regions,
        min_tissue_fraction=min_tissue_fraction,
    ).analysis


def analyze_slide_timed(
    slide_path: Path,
    classifier: Classifier,
    *,
    tile_workers: int,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    regions: list[Polygon] | None = None,
    min_tissue_fraction: float = MIN_TISSUE_FRACTION,
) -> TimedAnalysis:
    """``analyze_slide``, with the seconds of its sub-stages (tissue, tiles + classify, regions) and
    how long the classifier waited for tiles."""
    timings = AnalysisTimings()
    started = time.perf_counter()
    with open_slide(slide_path) as slide:
        mpp_x, mpp_y = slide_mpp(slide)
        width, height = slide.dimensions
        mask = detect_tissue(slide)
        geometry = tile_geometry(slide, tile_px=classifier.tile_px, target_mpp=classifier.mpp)
        specs = tile_grid(
            slide,
            mask,
            tile_px=classifier.tile_px,
            target_mpp=classifier.mpp,
            min_tissue_fraction=min_tissue_fraction,
        )
    if regions is not None:
        specs = _inside_regions(specs, regions)
        logger.info("%d tiles inside the %d requested region(s)", len(specs), len(regions))

    timings.tissue_s = time.perf_counter() - started

    probabilities, timings.classify = classify_batches(
        read_tiles(slide_path, specs, tile_px=classifier.tile_px, batch_size=batch_size, workers=tile_workers),
        classifier,
        total=len(specs),
        progress=progress,
    )

    started = time.perf_counter()
    class_names = list(classifier.class_names)
    labels = probabilities.argmax(axis=1)
    tiles = [
        TileResult(
            x=spec.x,
            y=spec.y,
            width=min(spec.x + spec.width, width) - spec.x,
            height=min(spec.y + spec.height, height) - spec.y,
            probabilities=[round(float(p), 6) for p in probabilities[i]],
            label=class_names[int(labels[i])],
            tissue_fraction=round(min(1.0, spec.tissue_fraction), 6),
        )
        for i, spec in enumerate(specs)
    ]
    mm2_per_px = mpp_x * mpp_y / 1e6
    class_regions = [
        _class_region(
            name,
            classifier.class_colors[k],
            [(spec, tile) for spec, tile, lab in zip(specs, tiles, labels, strict=True) if lab == k],
            tile_size=(geometry.tile_width, geometry.tile_height),
            slide_size=(width, height),
            mm2_per_px=mm2_per_px,
        )
        for k, name in enumerate(class_names)
    ]
    analysed = _region_mask(mask, regions)
    summary = _summary(
        classifier.background_class,
        class_regions,
        tissue_area_mm2=float((mask.mask & analysed).sum()) * mask.pixel_mm2,
        analysed_area_mm2=width * height * mm2_per_px if regions is None else float(analysed.sum()) * mask.pixel_mm2,
    )
    analysis = SlideAnalysis(
        application_id=classifier.application_id,
        application_version=classifier.version,
        slide_width=width,
        slide_height=height,
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        class_names=class_names,
        class_colors=list(classifier.class_colors),
        background_class=classifier.background_class,
        classifier_tile_px=classifier.tile_px,
        classifier_mpp=classifier.mpp,
        tile_width=geometry.tile_width,
        tile_height=geometry.tile_height,
        read_level=geometry.level,
        read_width=geometry.read_width,
        read_height=geometry.read_height,
        tiles=tiles,
        regions=class_regions,
        summary=summary,
    )
    timings.regions_s = time.perf_counter() - started
    return TimedAnalysis(analysis, timings)


def classify_batches(
    batches: Iterable[Batch],
    classifier: Classifier,
    *,
    total: int,
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[NDArray[np.float32], ClassifyStats]:
    """Class probabilities of every tile of ``batches`` (``total`` tiles, in order), and where the
    time went: waiting for the next batch, classifying, reporting progress.

    The wait is what the batch iterator takes to hand over its next batch; the time it takes to
    start (first batch) counts as waiting, the time it takes to stop after the last one only in
    ``total_s``. ``clock`` is injectable so the accounting can be tested without sleeping.
    """
    stats = ClassifyStats()
    probabilities = np.zeros((total, len(classifier.class_names)), dtype=np.float32)
    started = clock()
    if progress is not None:
        progress(0, total)
    stats.reported_s += clock() - started
    last_log = started
    iterator = iter(batches)
    # Closed on any way out, so a failing classifier stops the tile workers at once (not whenever
    # the traceback that holds the generator is dropped).
    with contextlib.closing(iterator) if isinstance(iterator, Generator) else contextlib.nullcontext():
        while True:
            before = clock()
            try:
                batch, pixels = next(iterator)
            except StopIteration:
                break
            handed = clock()
            stats.waited_s += handed - before
            probabilities[stats.tiles : stats.tiles + len(batch)] = classifier.predict(pixels)
            computed = clock()
            stats.computed_s += computed - handed
            stats.tiles += len(batch)
            stats.batches += 1
            if progress is not None:
                progress(stats.tiles, total)
            now = clock()
            stats.reported_s += now - computed
            if now - last_log >= _LOG_EVERY_S or stats.tiles == total:
                last_log = now
                rate = stats.tiles / max(now - started, 1e-6)
                logger.info("classified %d/%d tiles (%.1f tiles/s)", stats.tiles, total, rate)
    stats.total_s = clock() - started
    if stats.batches:
        logger.info(
            "classifier waited %.1f %% of the tiles + classify stage (%.2f s of %.2f s; classifying %.2f s)",
            100.0 * stats.wait_fraction,
            stats.waited_s,
            stats.total_s,
            stats.computed_s,
        )
    return probabilities, stats


def _inside_regions(specs: list[TileSpec], regions: Sequence[Polygon]) -> list[TileSpec]:
    if not specs:
        return specs
    centres = np.array([spec.centre for spec in specs], dtype=np.float64)
    keep = np.zeros(len(specs), dtype=bool)
    for polygon in regions:
        if len(polygon) >= 3:
            keep |= points_in_poly(centres, np.asarray(polygon, dtype=np.float64))
    return [spec for spec, inside in zip(specs, keep, strict=True) if inside]


def _region_mask(mask: TissueMask, regions: Sequence[Polygon] | None) -> NDArray[np.bool_]:
    """The analysed area on the tissue mask's grid: everything, or the union of the regions."""
    if regions is None:
        return np.ones(mask.mask.shape, dtype=bool)
    inside = np.zeros(mask.mask.shape, dtype=bool)
    for polygon in regions:
        if len(polygon) >= 3:
            # polygon2mask takes (row, col) vertices and tests pixel centres at integer positions;
            # mask pixel c has its centre at level-0 x = (c + 0.5)·downsample_x.
            vertices = np.array([(y / mask.downsample_y - 0.5, x / mask.downsample_x - 0.5) for x, y in polygon])
            inside |= polygon2mask(mask.mask.shape, vertices)
    return inside


# --- class regions ---------------------------------------------------------------------------------


class TracedPolygon(NamedTuple):
    exterior: Ring  # level-0 px, closed, counter-clockwise in (x, y)
    holes: list[Ring]  # closed, clockwise
    tiles: NDArray[np.bool_]  # the group's tiles on the whole grid


def class_polygons(
    grid: NDArray[np.bool_], tile_size: tuple[int, int], slide_size: tuple[int, int]
) -> list[TracedPolygon]:
    """Merge the set tiles of a (rows × cols) grid into polygons in level-0 px.

    One polygon per 4-connected group of tiles: its exterior ring and the rings of its holes, plus
    the group's tiles. Outlines come from marching squares (scikit-image
    ``find_contours``) on the grid refined ×4, so they run along tile edges and cut each corner by
    an eighth of a tile; points are clipped to the slide. Rings are closed, exterior
    counter-clockwise and holes clockwise in the (x, y) plane (GeoJSON's rule).
    """
    groups = label(grid, connectivity=1)
    polygons = []
    for group in regionprops(groups):
        rows, cols = group.slice
        member = groups[rows, cols] == group.label
        # Background is 8-connected to match find_contours' fully_connected="low" for the group.
        filled = ndimage.binary_fill_holes(member, structure=np.ones((3, 3), dtype=bool))
        origin = (rows.start, cols.start)
        exterior = _trace(filled, "low", origin=origin, tile_size=tile_size, slide_size=slide_size)
        holes_grid = label(filled & ~member, connectivity=2)
        holes = [
            _trace(holes_grid == k, "high", origin=origin, tile_size=tile_size, slide_size=slide_size)
            for k in range(1, int(holes_grid.max()) + 1)
        ]
        full = np.zeros_like(grid)
        full[rows, cols] = member
        polygons.append(TracedPolygon(_oriented(exterior, ccw=True), [_oriented(h, ccw=False) for h in holes], full))
    return polygons


def _trace(
    mask: NDArray[np.bool_],
    connectivity: str,
    *,
    origin: tuple[int, int],
    tile_size: tuple[int, int],
    slide_size: tuple[int, int],
) -> Ring:
    """The outline of one connected blob of ``mask`` (whose [0, 0] is grid (row, col) ``origin``) as
    a closed ring in level-0 px."""
    refined = np.kron(mask, np.ones((_REFINE, _REFINE), dtype=np.uint8)).astype(np.float32)
    padded = np.pad(refined, 1)
    contours = find_contours(padded, 0.5, fully_connected=connectivity)
    contour = max(contours, key=len)  # one blob → one contour; max() guards against noise
    contour = approximate_polygon(contour, tolerance=0.01)
    # Refined cell i (after removing the pad) covers grid [i/R, (i+1)/R); its centre is at (i+0.5)/R.
    grid_rows = (contour[:, 0] - 1 + 0.5) / _REFINE + origin[0]
    grid_cols = (contour[:, 1] - 1 + 0.5) / _REFINE + origin[1]
    xs = np.clip(grid_cols * tile_size[0], 0, slide_size[0])
    ys = np.clip(grid_rows * tile_size[1], 0, slide_size[1])
    ring: Ring = []
    for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
        point = (round(x, 2), round(y, 2))
        if not ring or ring[-1] != point:
            ring.append(point)
    if ring[0] != ring[-1]:
        ring.append(ring[0])
    return ring


def _signed_area(ring: Ring) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


def _oriented(ring: Ring, *, ccw: bool) -> Ring:
    return ring if (_signed_area(ring) > 0) == ccw else ring[::-1]


def _class_region(
    name: str,
    color: tuple[int, int, int],
    members: list[tuple[TileSpec, TileResult]],
    *,
    tile_size: tuple[int, int],
    slide_size: tuple[int, int],
    mm2_per_px: float,
) -> ClassRegion:
    tile_area = {(spec.row, spec.col): tile.width * tile.height * mm2_per_px for spec, tile in members}
    polygons: list[RegionPolygon] = []
    if members:
        rows = max(spec.row for spec, _ in members) + 1
        cols = max(spec.col for spec, _ in members) + 1
        grid = np.zeros((rows, cols), dtype=bool)
        for spec, _ in members:
            grid[spec.row, spec.col] = True
        for exterior, holes, group in class_polygons(grid, tile_size, slide_size):
            # The area of a polygon is that of its tiles (clipped to the slide), not of the traced
            # outline, whose corners are cut.
            area = sum(tile_area[(int(r), int(c))] for r, c in zip(*np.nonzero(group), strict=True))
            if len(exterior) >= 4:
                polygons.append(
                    RegionPolygon(exterior=exterior, holes=[h for h in holes if len(h) >= 4], area_mm2=area)
                )
    return ClassRegion(
        label=name,
        color=color,
        polygons=polygons,
        tile_count=len(members),
        area_mm2=sum(tile_area.values()),
    )


def _summary(
    background: str | None,
    regions: list[ClassRegion],
    *,
    tissue_area_mm2: float,
    analysed_area_mm2: float,
) -> AnalysisSummary:
    counts = {region.label: region.tile_count for region in regions}
    total = sum(counts.values())
    foreground = {name: n for name, n in counts.items() if name != background}
    foreground_total = sum(foreground.values())
    return AnalysisSummary(
        tile_count=total,
        tile_counts=counts,
        class_fractions={name: (n / total if total else 0.0) for name, n in counts.items()},
        tissue_class_fractions=(
            {name: n / foreground_total for name, n in foreground.items()}
            if background is not None and foreground_total
            else {}
        ),
        class_areas_mm2={region.label: region.area_mm2 for region in regions},
        tissue_area_mm2=tissue_area_mm2,
        analysed_area_mm2=analysed_area_mm2,
    )
