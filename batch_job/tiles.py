"""Tile reading in worker processes, so the classifier never waits on JPEG decoding.

``read_tiles`` yields batches ``(specs, pixels)`` in grid order, ``pixels`` being
``N × tile_px × tile_px × 3`` uint8 RGB at the classifier's resolution. Each worker process opens the
slide once and decodes whole batches. At most ``max_pending`` batches are in flight or waiting,
so memory stays bounded whatever the slide size (never a whole level). ``workers=0`` reads in
this process.

Workers are started with the 'spawn' method: the parent may hold CUDA state and threads (torch),
which must not be forked. A spawned worker re-imports the parent's ``__main__`` module, so that
module should keep heavy imports (torch) inside its functions.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import openslide
from numpy.typing import NDArray
from PIL import Image

from batch_job.slide import TileSpec, open_slide, rgba_to_rgb
from slidebridge.errors import UnreadableSlideError

logger = logging.getLogger(__name__)

Batch = tuple[list[TileSpec], NDArray[np.uint8]]

_MAX_AUTO_WORKERS = 8


def auto_workers(setting: int) -> int:
    """Worker count for the ``tile_workers`` setting: 0 means one per CPU core, at most 8."""
    if setting > 0:
        return setting
    return max(1, min(_MAX_AUTO_WORKERS, os.cpu_count() or 1))


def read_tile(slide: openslide.OpenSlide, spec: TileSpec, tile_px: int) -> NDArray[np.uint8]:
    """One tile as ``tile_px × tile_px × 3`` RGB (area past the slide edge is white)."""
    try:
        region = slide.read_region((spec.x, spec.y), spec.level, (spec.read_width, spec.read_height))
    except openslide.OpenSlideError as exc:
        raise UnreadableSlideError(f"cannot read the slide at level-0 ({spec.x}, {spec.y}): {exc}") from exc
    rgb = rgba_to_rgb(region)
    if rgb.shape[:2] == (tile_px, tile_px):
        return rgb
    # BOX (area average) when shrinking avoids aliasing; bilinear when a coarse slide must be enlarged.
    shrinking = spec.read_width >= tile_px and spec.read_height >= tile_px
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize((tile_px, tile_px), method))


def read_batch(slide: openslide.OpenSlide, specs: Sequence[TileSpec], tile_px: int) -> NDArray[np.uint8]:
    pixels = np.empty((len(specs), tile_px, tile_px, 3), dtype=np.uint8)
    for i, spec in enumerate(specs):
        pixels[i] = read_tile(slide, spec, tile_px)
    return pixels


# --- worker process side --------------------------------------------------------------------------

_worker_slide: openslide.OpenSlide | None = None


def _init_worker(path: str) -> None:
    global _worker_slide  # noqa: PLW0603 - one slide handle per worker process, opened once
    _worker_slide = open_slide(Path(path))


def _read_in_worker(specs: list[TileSpec], tile_px: int) -> NDArray[np.uint8]:
    assert _worker_slide is not None, "worker not initialised"
    return read_batch(_worker_slide, specs, tile_px)


# --- parent side ----------------------------------------------------------------------------------


def read_tiles(
    slide_path: Path,
    specs: Sequence[TileSpec],
    *,
    tile_px: int,
    batch_size: int,
    workers: int,
    max_pending: int | None = None,
) -> Iterator[Batch]:
    """Batches of ``batch_size`` tiles, in the order of ``specs``.

    With ``workers > 0``, up to ``max_pending`` (default two per worker) batches are read ahead by
    the pool. Closing the iterator early or an error in a worker cancels what is queued and shuts
    the pool down; a worker's UnreadableSlideError reaches the caller as is.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    batches = [list(specs[start : start + batch_size]) for start in range(0, len(specs), batch_size)]
    if not batches:
        return
    if workers <= 0:
        with open_slide(slide_path) as slide:
            for batch in batches:
                yield batch, read_batch(slide, batch, tile_px)
        return

    workers = min(workers, len(batches))
    window = max_pending if max_pending is not None else 2 * workers
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(str(slide_path),),
    )
    pending: deque[tuple[list[TileSpec], Future[NDArray[np.uint8]]]] = deque()
    queued = iter(batches)
    try:
        for batch in queued:
            pending.append((batch, pool.submit(_read_in_worker, batch, tile_px)))
            if len(pending) >= window:
                break
        while pending:
            batch, future = pending.popleft()
            pixels = future.result()
            # Top the window up before handing the batch out, so workers read while the caller computes.
            following = next(queued, None)
            if following is not None:
                pending.append((following, pool.submit(_read_in_worker, following, tile_px)))
            yield batch, pixels
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
