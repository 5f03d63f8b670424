"""Tile reading: OpenSlide ``read_region`` in one process against the pipeline's tile reader.

    python -m bench.tiles [--size 40000] [--tiles N] [--workers 0] [--rounds 3]

On a generated ``size × size`` JPEG-compressed pyramidal TIFF (Aperio layout, 256 px TIFF tiles,
0.25 µm/px; cached under ``.bench-data/``), both read the same tiles, in two rows (``--tiles N``: N
of them each, evenly spread):

- aligned: every 256 px level-0 tile of the grid anchored at (0, 0) with at least half its area on
  detected tissue, so every tile is one tile of the TIFF;
- production grid: the tiles the default classifier (``he-tissue``: 224 px at 1 µm/px) is given,
  on the grid and with the tissue threshold the pipeline uses; on this slide 896 level-0 px each,
  read at level 1 (downsample 4) as 224 px regions that straddle the TIFF's tiles.

- baseline: ``OpenSlide.read_region`` per tile in this process, converted to an RGB array
  (``batch_job.tile_reader.read_tile``, what the pipeline did before).
- ours: ``batch_job.tiles.read_tiles`` as the pipeline calls it: its default worker count (one per
  core), batches of the classifier batch size (64). Each run is in a fresh process, as a job is,
  timed from the call to the last batch, so starting the workers (and their fork server) counts.
  Also timed in one process (``workers=0``), to separate decoding from parallelism.

Each side runs ``--rounds`` times, alternating, and the medians are compared. The slide file is read
once before timing, so both read from the page cache. Pixels: about 256 tiles, evenly spread, from
each timed run of ours are compared with OpenSlide's (every tile, with ``--tiles`` up to 256); any
difference exits with status 1.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench import BenchRow

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    import numpy as np
    from numpy.typing import NDArray

    from batch_job.slide import TileSpec

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".bench-data"
TILE = 256  # px: the generated TIFF's tile size, and the tiles read
MPP = 0.25
_SAMPLE = 256  # tiles compared pixel by pixel


def _warm_page_cache(path: Path) -> None:
    with path.open("rb") as file:
        while file.read(16 * 1024 * 1024):
            pass


def _spread(specs: list[TileSpec], limit: int | None) -> list[TileSpec]:
    """At most ``limit`` of ``specs``, evenly spread, in their order."""
    if limit is not None and limit < len(specs):
        step = len(specs) / limit
        specs = [specs[int(i * step)] for i in range(limit)]
    return specs


def tissue_tiles(path: Path, limit: int | None) -> list[TileSpec]:
    """The aligned level-0 tissue tiles (``TileSpec``), at most ``limit`` of them, evenly spread."""
    from batch_job.slide import detect_tissue, open_slide, slide_mpp, tile_grid  # noqa: PLC0415 - keep spawn light

    with open_slide(path) as slide:
        mpp = min(slide_mpp(slide))
        # target_mpp = the slide's own mpp: tiles of TILE level-0 px read at level 0, on the TIFF grid.
        specs = tile_grid(slide, detect_tissue(slide), tile_px=TILE, target_mpp=mpp, min_tissue_fraction=0.5)
    return _spread(specs, limit)


def production_tiles(path: Path, limit: int | None) -> tuple[list[TileSpec], int]:
    """(the default classifier's tiles of the slide, as the pipeline lays them out, at most ``limit``
    evenly spread; the classifier's tile size in px)."""
    from batch_job.analyze import MIN_TISSUE_FRACTION  # noqa: PLC0415
    from batch_job.classifiers.he_tissue import HeTissueClassifier as Default  # noqa: PLC0415 - torch
    from batch_job.slide import detect_tissue, open_slide, tile_grid  # noqa: PLC0415

    with open_slide(path) as slide:
        specs = tile_grid(
            slide,
            detect_tissue(slide),
            tile_px=Default.tile_px,
            target_mpp=Default.mpp,
            min_tissue_fraction=MIN_TISSUE_FRACTION,
        )
    return _spread(specs, limit), Default.tile_px


@dataclass
class TilesResult:
    row: BenchRow
    details: dict[str, object]
    compared: int  # tiles whose pixels were compared with OpenSlide's
    differing: int
    max_diff: int


def _time_baseline(path: Path, specs: list[TileSpec], tile_px: int) -> float:
    """Seconds for OpenSlide ``read_region`` (as RGB arrays of ``tile_px``) over ``specs`` in this process."""
    from batch_job.slide import open_slide  # noqa: PLC0415 - spawned workers re-import this module: keep it light
    from batch_job.tile_reader import read_tile  # noqa: PLC0415

    with open_slide(path) as slide:
        started = time.perf_counter()
        for spec in specs:
            read_tile(slide, spec, tile_px)
        return time.perf_counter() - started


def _time_ours(
    path: Path, specs: list[TileSpec], *, tile_px: int, batch_size: int, workers: int, sample: set[int]
) -> tuple[float, dict[int, NDArray[np.uint8]]]:
    """Seconds for ``read_tiles`` over ``specs``, from the call to the last batch; and copies of the
    tiles whose indices are in ``sample``."""
    from batch_job.tiles import read_tiles  # noqa: PLC0415

    kept: dict[int, NDArray[np.uint8]] = {}
    index = 0
    started = time.perf_counter()
    for batch, pixels in read_tiles(path, specs, tile_px=tile_px, batch_size=batch_size, workers=workers):
        for i in range(len(batch)):
            if index + i in sample:
                kept[index + i] = pixels[i].copy()
        index += len(batch)
    return time.perf_counter() - started, kept


def _compare(path: Path, specs: list[TileSpec], kept: dict[int, NDArray[np.uint8]], tile_px: int) -> tuple[int, int]:
    """(tiles that differ from OpenSlide's, largest absolute difference) over the kept tiles."""
    import numpy as np  # noqa: PLC0415

    from batch_job.slide import open_slide  # noqa: PLC0415
    from batch_job.tile_reader import read_tile  # noqa: PLC0415

    differing, max_diff = 0, 0
    with open_slide(path) as slide:
        for i, ours in kept.items():
            diff = int(np.abs(read_tile(slide, specs[i], tile_px).astype(np.int16) - ours.astype(np.int16)).max())
            differing += diff > 0
            max_diff = max(max_diff, diff)
    return differing, max_diff


def _ours_in_fresh_process(conn: Connection, path: Path, specs: list[TileSpec], options: dict[str, int]) -> None:
    """A fresh process per run, as a job starts: its workers (and their fork server) start cold."""
    sample = set(range(0, len(specs), max(1, len(specs) // options["sample"])))
    tile_px = options["tile_px"]
    seconds, kept = _time_ours(
        path, specs, tile_px=tile_px, batch_size=options["batch_size"], workers=options["workers"], sample=sample
    )
    conn.send((seconds, len(kept), *_compare(path, specs, kept, tile_px)))


def _time_ours_fresh(
    path: Path, specs: list[TileSpec], *, tile_px: int, batch_size: int, workers: int, sample: int
) -> tuple[float, int, int, int]:
    """(seconds, tiles compared, tiles differing, max abs diff) of ``_time_ours`` in a fresh process."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    options = {"tile_px": tile_px, "batch_size": batch_size, "workers": workers, "sample": sample}
    child = context.Process(target=_ours_in_fresh_process, args=(send, path, specs, options))
    child.start()
    send.close()
    try:
        result: tuple[float, int, int, int] = receive.recv()
    except EOFError:
        child.join()
        raise SystemExit(f"the measuring process failed (exit code {child.exitcode})") from None
    child.join()
    return result


def _measure(
    path: Path, specs: list[TileSpec], *, tile_px: int, batch_size: int, workers: int, rounds: int
) -> tuple[dict[str, list[float]], int, int, int, int]:
    """({"baseline", "ours", "single"}: seconds per run; tiles read straight from the TIFF; tiles
    compared, differing and the largest difference) for one set of tiles."""
    from batch_job.tile_reader import TileReader  # noqa: PLC0415

    with TileReader(path) as reader:
        direct = sum(reader.is_direct(spec) for spec in specs)
    # Baseline and ours alternate (A B B A ...), so a neighbour's burst of load falls on both alike.
    seconds: dict[str, list[float]] = {"baseline": [], "ours": [], "single": []}
    compared = differing = max_diff = 0
    for round_no in range(rounds):
        steps = ("baseline", "ours") if round_no % 2 == 0 else ("ours", "baseline")
        for step in steps:
            if step == "baseline":
                seconds["baseline"].append(_time_baseline(path, specs, tile_px))
                continue
            run_s, checked, wrong, worst = _time_ours_fresh(
                path, specs, tile_px=tile_px, batch_size=batch_size, workers=workers, sample=_SAMPLE
            )
            seconds["ours"].append(run_s)
            compared, differing, max_diff = compared + checked, differing + wrong, max(max_diff, worst)
            # In one process too: how much is decoding, how much is the workers.
            seconds["single"].append(
                _time_ours(path, specs, tile_px=tile_px, batch_size=batch_size, workers=0, sample=set())[0]
            )
    return seconds, direct, compared, differing, max_diff


def run(size: int, limit: int | None, workers: int, rounds: int) -> list[TilesResult]:
    """The aligned row, then the production-grid row."""
    from batch_job.tiles import auto_workers  # noqa: PLC0415
    from local.demo import cached_synthetic_slide  # noqa: PLC0415
    from slidebridge.settings import Settings  # noqa: PLC0415

    started = time.perf_counter()
    path = cached_synthetic_slide(CACHE, size, size, mpp=MPP).path
    prepared_s = time.perf_counter() - started
    aligned = tissue_tiles(path, limit)
    production, production_px = production_tiles(path, limit)
    if not aligned or not production:
        raise SystemExit("no tissue tiles found")
    worker_count = auto_workers(workers)
    batch_size = int(Settings.model_fields["classifier_batch_size"].default)
    _warm_page_cache(path)
    generated = f" (generated in {prepared_s:.0f} s)" if prepared_s > 5 else ""
    slide_line = f"{size}x{size} px at {MPP} µm/px, {path.stat().st_size / 1e6:.0f} MB, {TILE} px JPEG tiles{generated}"

    first = production[0]
    production_what = (
        f"he-tissue tiles ({first.width}x{first.height} level-0 px, read at level {first.level}"
        f" as {first.read_width}x{first.read_height} px, given to the classifier at {production_px} px)"
    )
    rows = (
        (aligned, TILE, f"tiles: {TILE} px JPEG, {worker_count} workers", f"aligned {TILE} px level-0 tissue tiles"),
        (production, production_px, f"tiles (production grid): he-tissue, {worker_count} workers", production_what),
    )
    results = []
    for specs, tile_px, stage, what in rows:
        seconds, direct, compared, differing, max_diff = _measure(
            path, specs, tile_px=tile_px, batch_size=batch_size, workers=worker_count, rounds=rounds
        )
        count = len(specs)

        def rate(runs_s: list[float], count: int = count) -> str:
            runs = ", ".join(f"{count / s:.0f}" for s in runs_s)
            return f"{count / statistics.median(runs_s):.0f} tiles/s (median of {len(runs_s)}: {runs})"

        row = BenchRow(
            stage=stage,
            baseline=count / statistics.median(seconds["baseline"]),
            ours=count / statistics.median(seconds["ours"]),
            unit="tiles/s",
        )
        details: dict[str, object] = {
            "row": stage,
            "slide": slide_line,
            "tiles": f"{count} {what}, {direct} read straight from the TIFF",
            "cores": os.cpu_count(),
            "baseline: OpenSlide, 1 process": rate(seconds["baseline"]),
            f"ours: read_tiles, {worker_count} workers": rate(seconds["ours"]),
            "ours: read_tiles, in 1 process": rate(seconds["single"]),
            "ratio (medians)": f"{row.ratio:.1f}x",
            "pixels": f"{compared} sampled tiles compared with OpenSlide: {differing} differ (max abs diff {max_diff})",
        }
        results.append(TilesResult(row=row, details=details, compared=compared, differing=differing, max_diff=max_diff))
    return results


def main(argv: list[str] | None = None) -> list[BenchRow]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40000, help="slide side in level-0 px")
    parser.add_argument("--tiles", type=int, default=None, help="read at most this many tissue tiles")
    parser.add_argument("--workers", type=int, default=0, help="tile workers (0 = the pipeline's default)")
    parser.add_argument("--rounds", type=int, default=3, help="times each side runs; medians are compared")
    args = parser.parse_args(argv)
    results = run(args.size, args.tiles, args.workers, max(1, args.rounds))
    width = max(len(key) for result in results for key in result.details)
    for number, result in enumerate(results):
        if number:
            print()
        for key, value in result.details.items():
            print(f"{key:<{width}}  {value}")
    if any(result.differing or not result.compared for result in results):
        print("FAIL: our pixels differ from OpenSlide's", file=sys.stderr)
        raise SystemExit(1)
    return [result.row for result in results]


if __name__ == "__main__":
    main()
