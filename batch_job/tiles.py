"""Tile reading in worker processes, so the classifier never waits on JPEG decoding.

``read_tiles`` yields batches ``(specs, pixels)`` in grid order, ``pixels`` being
``N × tile_px × tile_px × 3`` uint8 RGB at the classifier's resolution. Each worker process opens the
slide once (a ``batch_job.tile_reader.TileReader``: regions of JPEG TIFF levels assembled from the
tiles they cover, with a decoded-tile cache of at most 32 MiB per reader; the rest through OpenSlide)
and decodes whole batches. At most ``max_pending`` batches are in flight or waiting, so memory stays
bounded whatever the slide size (never a whole level).
``workers=0`` reads in this process. With workers, this process still reads the first batches
itself: the workers are started only for a job that will outlast their start-up, and this process
goes on reading while they start.

Workers decode into slots of one shared-memory block and hand back only "done": pickling the pixels
through the pool's pipes cost more than decoding them (a 64-tile batch is 10-13 MB). The parent
copies each batch out of its slot before handing it on, so callers may keep the arrays. Where no
block can be had (too little room in ``/dev/shm``), the pixels come back through the pipes.

Workers are forked from multiprocessing's fork server, never from the parent: the parent may hold
CUDA state and threads (torch), which must not be forked. The server is a fresh interpreter started
once per process, with this module (and the slide stack: OpenSlide, NumPy, SciPy, ...) imported
before it forks, so a worker starts in milliseconds rather than the half second of imports a
'spawn' worker pays, and a later ``read_tiles`` in the same job starts its workers at once. A worker
still re-imports the parent's ``__main__`` module (unless that is a package's ``__main__``), so that
module should keep heavy imports (torch) inside its functions.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from batch_job.slide import TileSpec
from batch_job.tile_reader import TileReader, read_tile

__all__ = ["Batch", "auto_workers", "read_tile", "read_tiles"]

logger = logging.getLogger(__name__)

Batch = tuple[list[TileSpec], NDArray[np.uint8]]

_MAX_AUTO_WORKERS = 8
# This process reads the first batches, and more while workers start (off only in tests of the pool alone).
_READ_WHILE_STARTING = True
# Workers are started once this process has read for _PACE_S and what is left would take it longer
# than _POOL_START_S: about what starting them costs the first time (the fork server's imports).
_PACE_S = 0.1
_POOL_START_S = 0.5
# Where Linux keeps POSIX shared memory (a tmpfs; Docker's default is 64 MiB, our Batch jobs get 2 GiB).
_SHM_DIR = Path("/dev/shm")  # noqa: S108 - the system's, not a temporary file of ours
_SHM_SHARE = 0.5  # take at most this share of its free space: others (PyTorch data loaders) use it too


def auto_workers(setting: int) -> int:
    """Worker count for the ``tile_workers`` setting: 0 means one per CPU core, at most 8."""
    if setting > 0:
        return setting
    return max(1, min(_MAX_AUTO_WORKERS, os.cpu_count() or 1))


def _worker_context() -> multiprocessing.context.BaseContext:
    """Fork server where the platform has one (Linux, macOS), else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Takes effect when the server starts (the first pool of this process); harmless after.
    context.set_forkserver_preload([__name__])
    return context


def _batch_view(buffer: memoryview | None, offset: int, count: int, tile_px: int) -> NDArray[np.uint8]:
    assert buffer is not None, "shared memory closed"
    return np.ndarray((count, tile_px, tile_px, 3), dtype=np.uint8, buffer=buffer, offset=offset)


def _create_slots(slots: int, slot_bytes: int) -> SharedMemory | None:
    """A shared block for ``slots`` batches of ``slot_bytes``, its memory reserved; None where it won't fit."""
    size = slots * slot_bytes
    on_tmpfs = sys.platform == "linux" and _SHM_DIR.is_dir()
    if on_tmpfs:
        stat = os.statvfs(_SHM_DIR)
        if size > _SHM_SHARE * stat.f_bavail * stat.f_frsize:
            logger.info("tile workers return pixels through pipes: %d MiB would not fit in %s", size >> 20, _SHM_DIR)
            return None
    try:
        block = SharedMemory(create=True, size=size)
    except OSError as exc:
        logger.info("tile workers return pixels through pipes: no shared memory (%s)", exc)
        return None
    if on_tmpfs:
        # A tmpfs hands out pages on first write, and a write it cannot serve kills the writer with
        # SIGBUS; reserving them now turns "no room" into an error we can step around.
        try:
            fd = os.open(_SHM_DIR / block.name, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as exc:
            logger.info("tile workers return pixels through pipes: cannot reserve %d MiB (%s)", size >> 20, exc)
            _release(block)
            return None
    return block


def _release(block: SharedMemory) -> None:
    # A view left by an error in flight keeps the mapping open; it goes with the process.
    with contextlib.suppress(BufferError):
        block.close()
    block.unlink()


# --- worker process side --------------------------------------------------------------------------

_worker_reader: TileReader | None = None
_worker_slots: SharedMemory | None = None


def _init_worker(path: str, slots_name: str | None) -> None:
    global _worker_reader, _worker_slots  # noqa: PLW0603 - one slide handle per worker process, opened once
    _worker_reader = TileReader(Path(path))
    if slots_name is not None:
        # Attached once for the worker's life; the parent owns and unlinks the block. Workers share
        # the parent's resource tracker (multiprocessing passes it on), so attaching leaks nothing.
        _worker_slots = SharedMemory(name=slots_name)


def _ready() -> None:
    """A no-op: done once a worker has started and opened the slide."""


def _read_in_worker(specs: list[TileSpec], tile_px: int) -> NDArray[np.uint8] | None:
    assert _worker_reader is not None, "worker not initialised"
    return _worker_reader.read_batch(specs, tile_px)


def _read_into_slot(specs: list[TileSpec], tile_px: int, offset: int) -> NDArray[np.uint8] | None:
    """Read into the shared block; None tells the parent the pixels are there."""
    assert _worker_reader is not None and _worker_slots is not None, "worker not initialised"
    _worker_reader.read_batch(specs, tile_px, out=_batch_view(_worker_slots.buf, offset, len(specs), tile_px))
    return None


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

    With ``workers > 0``, this process reads the first batches itself, and starts the workers only
    for a job that will outlast their start-up; up to ``max_pending`` (default two per worker)
    batches are then read ahead by the pool. Closing the iterator early or an error in a worker
    cancels what is queued and shuts the pool down; a worker's UnreadableSlideError reaches the
    caller as is.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    batches = [list(specs[start : start + batch_size]) for start in range(0, len(specs), batch_size)]
    if not batches:
        return
    with TileReader(slide_path) as reader:
        first = 0
        started = time.monotonic()
        while first < len(batches) and (workers <= 0 or _READ_WHILE_STARTING):
            elapsed = time.monotonic() - started
            # Judged on the pace so far (the caller's time between batches included), from the end
            # of the first batch: that one also pays one-off costs (the codecs' first use, the
            # caller's warm-up) that made short jobs look long and start workers they then waited
            # for. Workers pay off once what is left would take longer than starting them.
            if (
                workers > 0
                and first > 1
                and elapsed >= _PACE_S
                and elapsed / (first - 1) * (len(batches) - first) > _POOL_START_S
            ):
                break
            yield batches[first], reader.read_batch(batches[first], tile_px)
            first += 1
            if first == 1:
                started = time.monotonic()
        if first == len(batches):
            return

        workers = min(workers, len(batches) - first)
        window = max(1, min(max_pending if max_pending is not None else 2 * workers, len(batches) - first))
        slot_bytes = batch_size * tile_px * tile_px * 3
        slots = _create_slots(window, slot_bytes)
        try:
            yield from _read_with_pool(
                slide_path,
                batches[first:],
                reader,
                tile_px=tile_px,
                workers=workers,
                window=window,
                slots=slots,
                slot_bytes=slot_bytes,
            )
        finally:
            if slots is not None:
                _release(slots)


def _read_with_pool(
    slide_path: Path,
    batches: list[list[TileSpec]],
    reader: TileReader,
    *,
    tile_px: int,
    workers: int,
    window: int,
    slots: SharedMemory | None,
    slot_bytes: int,
) -> Iterator[Batch]:
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=_worker_context(),
        initializer=_init_worker,
        initargs=(str(slide_path), None if slots is None else slots.name),
    )
    free = list(range(window))  # slots not holding a batch in flight
    pending: deque[tuple[list[TileSpec], int, Future[NDArray[np.uint8] | None]]] = deque()

    def submit(batch: list[TileSpec]) -> None:
        slot = free.pop()
        if slots is None:
            future = pool.submit(_read_in_worker, batch, tile_px)
        else:
            future = pool.submit(_read_into_slot, batch, tile_px, slot * slot_bytes)
        pending.append((batch, slot, future))

    # Workers take a while to start the first time: the fork server imports the slide stack (about
    # 0.5 s, more on a busy machine), and the first ``submit`` waits for it. So the workers are
    # started from a helper thread while this process goes on reading; once every worker has
    # answered, the rest go to the pool.
    starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-pool-start")
    warming = starter.submit(lambda: [pool.submit(_ready) for _ in range(workers)])

    def warm() -> bool:
        return warming.done() and all(future.done() for future in warming.result())

    try:
        first = 0
        while _READ_WHILE_STARTING and first < len(batches) and not warm():
            yield batches[first], reader.read_batch(batches[first], tile_px)
            first += 1
        queued = iter(batches[first:])
        for batch in queued:
            submit(batch)
            if not free:
                break
        while pending:
            batch, slot, future = pending.popleft()
            result = future.result()
            if result is None:
                assert slots is not None
                # Copied out so the slot can take the next batch at once, and callers may keep this one.
                pixels = _batch_view(slots.buf, slot * slot_bytes, len(batch), tile_px).copy()
            else:
                pixels = result
            free.append(slot)
            # Top the window up before handing the batch out, so workers read while the caller computes.
            following = next(queued, None)
            if following is not None:
                submit(following)
            yield batch, pixels
    finally:
        starter.shutdown(wait=True)
        pool.shutdown(wait=True, cancel_futures=True)
