"""Synthetic H&E-like whole-slide images for the demo and the tests.

A slide is a procedural field defined on level-0 pixel coordinates (origin top-left, x right, y down):
eosin-pink tissue islands on a white background (about 30 % tissue), hematoxylin-purple nuclei
scattered through the stroma, and dense "cellular" patches where the nuclei crowd together. Every
pixel of every pyramid level is evaluated from that one field at the level-0 position of the pixel
centre, so levels agree with each other without ever reading a level back, and a tile can be
rendered on its own: the writers stream tile by tile and never hold a whole level in memory.

Writers:

- ``write_synthetic_slide``: an Aperio-style pyramidal TIFF (tiled, JPEG) that OpenSlide opens with
  the ``aperio`` backend and reports ``openslide.mpp-x``/``-y``.
- ``write_synthetic_dicom``: a DICOM WSI series (VL Whole Slide Microscopy Image, TILED_FULL, JPEG
  baseline), one file per pyramid level, that OpenSlide's ``dicom`` backend opens.
- ``write_synthetic_dicom_zip``: that series zipped, as a vendor would upload it.

``SyntheticTissue`` also exposes the ground truth (tissue and cellular masks at any downsample) so
tests can check tissue detection and classification against what was painted.
"""

from __future__ import annotations

import io
import itertools
import math
import multiprocessing
import tempfile
import zipfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from io import BufferedIOBase
from pathlib import Path
from typing import IO

import imagecodecs
import numpy as np
import tifffile
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate_buffer
from pydicom.uid import JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage, generate_uid

# Stain optical-density vectors used to *paint* (the Macenko et al. reference H&E vectors). They are
# deliberately not the Ruifrok-Johnston vectors the classifier deconvolves with: real slides never
# match those exactly either, so the classifier is tested against a realistic mismatch.
_H_OD = np.array([0.5626, 0.7201, 0.4062], dtype=np.float32)
_E_OD = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)
# Optical density of the glass: an empty area scans as RGB ≈ 246, not pure white.
_GLASS_OD = 0.035
_TISSUE_FRACTION = 0.30  # share of the slide covered by tissue
_CELLULAR_FRACTION = 0.30  # share of the tissue that is densely cellular
_NUCLEUS_SPACING_UM = 8.0  # one nucleus site per 8 µm × 8 µm cell of the nuclei lattice
_NOISE_BANK = 512  # side of the precomputed sensor-noise patch (px)
_MIN_LEVEL_SIDE = 1024  # the pyramid stops after the first level whose smaller side is below this
_LEVEL_FACTOR = 4  # each pyramid level is 4× smaller than the one above, as Aperio scanners write

_MASK32 = np.uint64(0xFFFFFFFF)

FloatArray = NDArray[np.float32]


def _hash01(ix: NDArray[np.int64], iy: NDArray[np.int64], salt: int) -> NDArray[np.float64]:
    """A uniform value in [0, 1) per integer lattice point (broadcasting ``ix`` against ``iy``).

    A hash, not a random generator, because every tile and every level must see the same value at
    the same lattice point without any shared state; that is what makes tiles seamless.
    """
    x = ix.astype(np.uint64) & _MASK32
    y = iy.astype(np.uint64) & _MASK32
    h = (x * np.uint64(0x9E3779B1) + y * np.uint64(0x85EBCA77) + np.uint64(salt) * np.uint64(0xC2B2AE3D)) & _MASK32
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x2C1B3C6D)) & _MASK32
    h ^= h >> np.uint64(12)
    h = (h * np.uint64(0x297A2D39)) & _MASK32
    h ^= h >> np.uint64(15)
    result: NDArray[np.float64] = h.astype(np.float64) / 4294967296.0
    return result


def _lattice_axis(coords: NDArray[np.float64], cell: float) -> tuple[NDArray[np.int64], FloatArray, int, int]:
    """For each coordinate: index of the lattice point before it (relative to the first one), the
    smoothstep weight of the point after it, the first lattice index and the lattice point count."""
    u = coords / cell
    i0 = np.floor(u).astype(np.int64)
    t = (u - i0).astype(np.float32)
    first = int(i0.min())
    return i0 - first, t * t * (3.0 - 2.0 * t), first, int(i0.max()) - first + 2


def _value_noise(xs: NDArray[np.float64], ys: NDArray[np.float64], cell: float, salt: int) -> FloatArray:
    """Smooth noise in [0, 1] with feature size ``cell`` (level-0 px), sampled at ``ys × xs``.

    Hashed lattice values, interpolated separably (rows, then columns) with smoothstep weights:
    two passes of gathers over the pixel grid, which keeps rendering fast.
    """
    ix, fx, x0, nx = _lattice_axis(xs, cell)
    iy, fy, y0, ny = _lattice_axis(ys, cell)
    lattice = _hash01(
        np.arange(x0, x0 + nx, dtype=np.int64)[None, :], np.arange(y0, y0 + ny, dtype=np.int64)[:, None], salt
    ).astype(np.float32)
    rows = lattice[iy] * (1.0 - fy)[:, None] + lattice[iy + 1] * fy[:, None]  # len(ys) × nx
    result: FloatArray = rows[:, ix] * (1.0 - fx) + rows[:, ix + 1] * fx
    return result


def _centres(start: float, count: int, step: float) -> NDArray[np.float64]:
    """Level-0 coordinates of the centres of ``count`` pixels of size ``step`` from ``start``."""
    return start + (np.arange(count, dtype=np.float64) + 0.5) * step


def pyramid_levels(width: int, height: int) -> list[tuple[int, int, int]]:
    """(downsample, width, height) of each level: ×4 steps until the smaller side drops below 1024."""
    levels = [(1, width, height)]
    while min(levels[-1][1:]) >= _MIN_LEVEL_SIDE:
        downsample = levels[-1][0] * _LEVEL_FACTOR
        levels.append((downsample, math.ceil(width / downsample), math.ceil(height / downsample)))
    return levels


class SyntheticTissue:
    """The procedural slide: ``render`` any region at any downsample; ``*_truth`` for tests.

    All coordinates are level-0 pixels; ``downsample`` is level-0 px per output pixel.
    """

    def __init__(self, width: int, height: int, *, seed: int = 0, mpp: float = 0.25) -> None:
        if width < 16 or height < 16:
            raise ValueError(f"slide too small: {width}x{height}")
        self.width = width
        self.height = height
        self.seed = seed
        self.mpp = mpp
        self._size = float(min(width, height))
        self._nucleus_cell = max(4.0, _NUCLEUS_SPACING_UM / mpp)  # level-0 px
        rng = np.random.default_rng(seed)
        self._noise = rng.normal(0.0, 1.6, size=(_NOISE_BANK, _NOISE_BANK, 3)).astype(np.float32)
        # Thresholds from a coarse sample of the whole slide, so the tissue share is ~30 % whatever
        # the seed, and the cellular share ~30 % of the tissue.
        step = max(width, height) / 192.0
        xs = _centres(0.0, math.ceil(width / step), step)
        ys = _centres(0.0, math.ceil(height / step), step)
        self._tissue_threshold = 0.0
        field = self._tissue_field(xs, ys)
        self._tissue_threshold = float(np.quantile(field, 1.0 - _TISSUE_FRACTION))
        cellular = self._cellular_field(xs, ys)[field > self._tissue_threshold]
        self._cellular_threshold = float(np.quantile(cellular, 1.0 - _CELLULAR_FRACTION)) if cellular.size else 1.0
        self._background_cache: dict[tuple[int, int], NDArray[np.uint8]] = {}

    # --- fields -------------------------------------------------------------------------------

    def _tissue_field(self, xs: NDArray[np.float64], ys: NDArray[np.float64]) -> FloatArray:
        """Tissue where this exceeds the threshold: islands a third of the slide across, with
        ragged outlines, kept off the slide edges."""
        field = np.zeros((ys.size, xs.size), dtype=np.float32)
        for octave in range(4):
            field += 0.5**octave * _value_noise(xs, ys, self._size / (2.5 * 2**octave), self.seed * 64 + octave)
        field /= 1.875
        edge_x = np.minimum(xs, self.width - xs) / self._size
        edge_y = np.minimum(ys, self.height - ys) / self._size
        edge = np.minimum(edge_y[:, None], edge_x[None, :]).astype(np.float32)
        field -= 0.6 * np.clip(1.0 - edge / 0.12, 0.0, 1.0)
        return field

    def _cellular_field(self, xs: NDArray[np.float64], ys: NDArray[np.float64]) -> FloatArray:
        return 0.6 * _value_noise(xs, ys, self._size / 4.0, self.seed * 64 + 10) + 0.4 * _value_noise(
            xs, ys, self._size / 8.0, self.seed * 64 + 11
        )

    def _tissue_cover(self, field: FloatArray) -> FloatArray:
        # A soft edge a few µm wide rather than a hard step, so outlines are not aliased.
        cover: FloatArray = np.clip((field - self._tissue_threshold) / 0.0015, 0.0, 1.0)
        return cover

    def _cellular_weight(self, field: FloatArray) -> FloatArray:
        weight: FloatArray = np.clip((field - self._cellular_threshold) / 0.02, 0.0, 1.0)
        return weight

    # --- ground truth -------------------------------------------------------------------------

    def _truth_grid(self, downsample: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        return (
            _centres(0.0, math.ceil(self.width / downsample), downsample),
            _centres(0.0, math.ceil(self.height / downsample), downsample),
        )

    def tissue_truth(self, downsample: float) -> NDArray[np.bool_]:
        """Where tissue was painted, on the grid of a level with this downsample (row = y)."""
        xs, ys = self._truth_grid(downsample)
        result: NDArray[np.bool_] = self._tissue_field(xs, ys) > self._tissue_threshold
        return result

    def cellular_truth(self, downsample: float) -> NDArray[np.bool_]:
        """Where densely cellular tissue was painted, on the same grid as ``tissue_truth``."""
        xs, ys = self._truth_grid(downsample)
        result: NDArray[np.bool_] = (self._tissue_field(xs, ys) > self._tissue_threshold) & (
            self._cellular_field(xs, ys) > self._cellular_threshold
        )
        return result

    # --- rendering ----------------------------------------------------------------------------

    def _background(self, h: int, w: int) -> NDArray[np.uint8]:
        key = (h, w)
        if key not in self._background_cache:
            glass = 255.0 * math.exp(-_GLASS_OD) + self._noise_window(0.0, h, w)
            self._background_cache[key] = np.clip(glass, 0, 255).astype(np.uint8)
        return self._background_cache[key]

    def _noise_window(self, shift: float, h: int, w: int) -> FloatArray:
        """An h × w window of the sensor-noise bank; ``shift`` in [0, 1) picks where."""
        bank = self._noise
        if h > _NOISE_BANK or w > _NOISE_BANK:
            bank = np.tile(bank, (math.ceil(h / _NOISE_BANK), math.ceil(w / _NOISE_BANK), 1))
        rows, cols = bank.shape[0] - h + 1, bank.shape[1] - w + 1
        start = int(shift * rows * cols)
        window: FloatArray = bank[start // cols : start // cols + h, start % cols : start % cols + w]
        return window

    def _nuclei(
        self,
        xs: NDArray[np.float64],
        ys: NDArray[np.float64],
        downsample: float,
        tissue: FloatArray,
        cellular: FloatArray,
    ) -> FloatArray:
        """Hematoxylin concentration of the nuclei at each pixel (OD units)."""
        cell = self._nucleus_cell
        if downsample * 3.0 > cell:
            # Pixels nearly as large as the nucleus spacing: paint the expected stain per pixel (what
            # a scanner's optics and the pyramid's averaging would show) instead of aliased dots.
            presence = 2.0 * tissue * (0.08 + 0.52 * cellular)
            radius = 0.21 + 0.1 * cellular
            expected: FloatArray = presence * (math.pi * radius * radius) * (0.97 + 0.15 * cellular)
            return expected
        # Two lattices, the second shifted by half a cell, so nuclei don't line up in a grid.
        cover = self._nuclei_lattice(xs, ys, downsample, 0.0, self.seed * 64 + 20)
        return np.maximum(cover, self._nuclei_lattice(xs, ys, downsample, 0.5, self.seed * 64 + 28))

    def _nuclei_lattice(
        self, xs: NDArray[np.float64], ys: NDArray[np.float64], downsample: float, shift: float, salt: int
    ) -> FloatArray:
        cell = self._nucleus_cell
        origin = shift * cell
        col = np.floor((xs - origin) / cell).astype(np.int64)
        row = np.floor((ys - origin) / cell).astype(np.int64)
        c0, r0 = int(col.min()), int(row.min())
        cols = np.arange(c0, int(col.max()) + 1, dtype=np.int64)
        rows = np.arange(r0, int(row.max()) + 1, dtype=np.int64)
        # Per lattice cell: presence, size, shape, position and darkness of its nucleus. Cellularity
        # is read at the cell centre so a nucleus is all there or not at all, in every tile and level.
        cx = np.asarray(origin + (cols + 0.5) * cell, dtype=np.float64)  # level-0 px
        cy = np.asarray(origin + (rows + 0.5) * cell, dtype=np.float64)
        cell_cellular = self._cellular_weight(self._cellular_field(cx, cy))
        cell_tissue = self._tissue_cover(self._tissue_field(cx, cy))
        cell_ix, cell_iy = cols[None, :], rows[:, None]

        def uniform(k: int) -> NDArray[np.float64]:
            return _hash01(cell_ix, cell_iy, salt + k)

        present = uniform(0) < cell_tissue * (0.08 + 0.52 * cell_cellular)
        radius = cell * (0.17 + 0.1 * cell_cellular + 0.08 * uniform(1))
        # Ellipses with random orientation: axes radius·stretch and radius/stretch.
        stretch = 0.7 + 0.6 * uniform(5)
        angle = np.pi * uniform(6)
        slack = np.maximum(0.5 * cell - radius * np.maximum(stretch, 1.0 / stretch), 0.0)
        centre_x = cx[None, :] + slack * (2.0 * uniform(2) - 1.0)
        centre_y = cy[:, None] + slack * (2.0 * uniform(3) - 1.0)
        darkness = (0.75 + 0.45 * uniform(4) + 0.15 * cell_cellular) * present

        index = (row - r0)[:, None] * cols.size + (col - c0)[None, :]

        def per_pixel(values: NDArray[np.float64]) -> FloatArray:
            gathered: FloatArray = values.astype(np.float32).ravel()[index]
            return gathered

        dx = xs.astype(np.float32)[None, :] - per_pixel(centre_x)
        dy = ys.astype(np.float32)[:, None] - per_pixel(centre_y)
        cos, sin, s = per_pixel(np.cos(angle)), per_pixel(np.sin(angle)), per_pixel(stretch)
        u = (cos * dx + sin * dy) / s
        v = (cos * dy - sin * dx) * s
        distance = np.sqrt(u * u + v * v)
        # Anti-aliased edge: coverage ramps over about one output pixel at the rim.
        cover = np.clip((per_pixel(radius) - distance) / max(downsample, 1.0) + 0.5, 0.0, 1.0)
        result: FloatArray = cover * per_pixel(darkness)
        return result

    def render(self, x0: float, y0: float, w: int, h: int, downsample: float) -> NDArray[np.uint8]:
        """RGB pixels (h × w × 3) of the region whose top-left corner is level-0 (x0, y0), where each
        output pixel spans ``downsample`` level-0 px and is evaluated at its centre."""
        xs = _centres(x0, w, downsample)
        ys = _centres(y0, h, downsample)
        tissue = self._tissue_cover(self._tissue_field(xs, ys))
        if not tissue.any():
            return self._background(h, w)
        cellular = self._cellular_weight(self._cellular_field(xs, ys)) * tissue
        texture = np.zeros_like(tissue)
        for cell_um, amplitude, salt in ((30.0, 0.35, 30), (7.0, 0.25, 31), (2.5, 0.15, 32)):
            cell = cell_um / self.mpp
            # Texture finer than the pixel would only alias into noise: fade it out.
            weight = amplitude * min(1.0, cell / (2.0 * downsample))
            if weight > 0.01:
                texture += weight * (_value_noise(xs, ys, cell, self.seed * 64 + salt) - 0.5)
        nuclei = self._nuclei(xs, ys, downsample, tissue, cellular) * tissue
        eosin = tissue * (0.55 + texture) * (1.0 - 0.35 * cellular) * (1.0 - 0.6 * np.clip(nuclei, 0, 1))
        hematoxylin = 0.06 * tissue + nuclei
        density = _GLASS_OD + hematoxylin[..., None] * _H_OD + np.clip(eosin, 0, None)[..., None] * _E_OD
        # Shift the sensor-noise window per region so neighbouring tiles don't repeat one pattern.
        shift = _hash01(np.array([int(x0)]), np.array([int(y0)]), self.seed * 64 + 40)[0]
        rgb = 255.0 * np.exp(-density) + self._noise_window(float(shift), h, w)
        result: NDArray[np.uint8] = np.clip(rgb, 0, 255).astype(np.uint8)
        return result

    def tiles(self, downsample: int, level_w: int, level_h: int, tile: int) -> Iterator[NDArray[np.uint8]]:
        """Full tiles of one level in row-major order (edge tiles run past the level and are clipped
        by readers), rendered one at a time: the streaming unit of both writers."""
        for ty in range(math.ceil(level_h / tile)):
            for tx in range(math.ceil(level_w / tile)):
                yield self.render(tx * tile * downsample, ty * tile * downsample, tile, tile, downsample)


# --- TIFF -------------------------------------------------------------------------------------


# Tiles per task of a rendering worker: big enough that pickling the result is cheap next to the
# rendering (16 tiles of 256 px: 3 MiB, ~80 ms of work), small enough to keep a few in flight.
_RENDER_RUN = 16

_worker_model: SyntheticTissue | None = None


def _init_render_worker(width: int, height: int, seed: int, mpp: float) -> None:
    global _worker_model  # noqa: PLW0603 - one model per worker process, built once
    _worker_model = SyntheticTissue(width, height, seed=seed, mpp=mpp)


def _render_run(downsample: int, tile: int, ty: int, tx0: int, tx1: int) -> NDArray[np.uint8]:
    assert _worker_model is not None, "worker not initialised"
    model = _worker_model
    return np.stack(
        [model.render(tx * tile * downsample, ty * tile * downsample, tile, tile, downsample) for tx in range(tx0, tx1)]
    )


def _tiles_in_pool(
    pool: ProcessPoolExecutor, downsample: int, level_w: int, level_h: int, tile: int, *, window: int
) -> Iterator[NDArray[np.uint8]]:
    """``SyntheticTissue.tiles`` rendered by ``pool``, in the same order, at most ``window`` runs ahead."""
    cols, rows = math.ceil(level_w / tile), math.ceil(level_h / tile)
    runs = iter([(ty, tx0, min(tx0 + _RENDER_RUN, cols)) for ty in range(rows) for tx0 in range(0, cols, _RENDER_RUN)])
    pending: deque[Future[NDArray[np.uint8]]] = deque(
        pool.submit(_render_run, downsample, tile, *run) for run in itertools.islice(runs, window)
    )
    while pending:
        chunk = pending.popleft().result()
        following = next(runs, None)
        if following is not None:
            pending.append(pool.submit(_render_run, downsample, tile, *following))
        yield from chunk


def write_synthetic_slide(
    path: Path,
    width: int,
    height: int,
    *,
    seed: int = 0,
    mpp: float = 0.25,
    tile: int = 256,
    quality: int = 85,
    workers: int = 1,
) -> Path:
    """Write an Aperio-style pyramidal TIFF of ``width × height`` level-0 px at ``mpp`` µm/px.

    Tiles are rendered and JPEG-compressed one at a time (tifffile consumes an iterator), so memory
    stays at a few tiles whatever the size; 100 000 × 80 000 is fine (about 5 ms per 256 px tile
    on one core, so some 11 minutes). ``workers > 1`` renders in that many processes, a bounded
    number of tiles ahead; the file is the same byte for byte, since every pixel is a pure function
    of its position and the seed.
    """
    model = SyntheticTissue(width, height, seed=seed, mpp=mpp)
    pool = (
        # spawn: a fresh interpreter per worker whatever threads the caller runs (fork would copy them).
        ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_render_worker,
            initargs=(width, height, seed, mpp),
        )
        if workers > 1
        else None
    )
    try:
        _write_pyramid(path, model, pool, workers, seed=seed, mpp=mpp, tile=tile, quality=quality)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return path


def _write_pyramid(
    path: Path,
    model: SyntheticTissue,
    pool: ProcessPoolExecutor | None,
    workers: int,
    *,
    seed: int,
    mpp: float,
    tile: int,
    quality: int,
) -> None:
    width, height = model.width, model.height
    # Classic TIFF offsets are 32-bit; switch to BigTIFF when the compressed file could pass 4 GiB.
    bigtiff = width * height * 3 > 2**32
    app_mag = round(10.0 / mpp)
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for index, (downsample, level_w, level_h) in enumerate(pyramid_levels(width, height)):
            # OpenSlide's aperio backend keys on "Aperio" at the start of the first description and
            # reads MPP/AppMag from its "|key = value" pairs.
            size = (
                f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
                if index == 0
                else (f"{width}x{height} -> {level_w}x{level_h}")
            )
            description = (
                f"Aperio Image Library v12.0.15 \r\n{size} JPEG/RGB Q={quality}"
                f"|AppMag = {app_mag}|MPP = {mpp:g}|Filename = synthetic-{seed}|ScanScope ID = SLIDEBRIDGE"
            )
            tiles = (
                model.tiles(downsample, level_w, level_h, tile)
                if pool is None
                else _tiles_in_pool(pool, downsample, level_w, level_h, tile, window=4 * workers)
            )
            tif.write(
                tiles,
                shape=(level_h, level_w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                description=description,
                metadata=None,
                software=False,
            )


# --- DICOM ------------------------------------------------------------------------------------


class _FrameWindow(BufferedIOBase):
    """A read-only view of ``length`` bytes at ``start`` of a shared spool file: one per frame, so
    pydicom can stream thousands of frames without thousands of open files."""

    def __init__(self, spool: IO[bytes], start: int, length: int) -> None:
        super().__init__()
        self._spool, self._start, self._length, self._pos = spool, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(base + offset, 0), self._length)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._length - self._pos
        count = remaining if size is None or size < 0 else min(size, remaining)
        self._spool.seek(self._start + self._pos)
        data = self._spool.read(count)
        self._pos += len(data)
        return data


def write_synthetic_dicom(
    folder: Path,
    width: int,
    height: int,
    *,
    seed: int = 0,
    mpp: float = 0.25,
    tile: int = 256,
    quality: int = 85,
) -> list[Path]:
    """Write a DICOM WSI series, one file per pyramid level, into ``folder``; return the files.

    What OpenSlide's dicom backend checks: SOP class VL Whole Slide Microscopy Image, the same
    SeriesInstanceUID in every file, ImageType ORIGINAL\\PRIMARY\\VOLUME\\NONE (level 0) or
    DERIVED\\PRIMARY\\VOLUME\\RESAMPLED, JPEG baseline with YBR_FULL_422, 8-bit 3-sample interleaved,
    TotalPixelMatrixColumns/Rows with Columns/Rows as the tile size, TILED_FULL frame order, and
    PixelSpacing (mm) in the shared functional groups for the mpp.

    Frames are compressed one at a time into a temporary spool file, then streamed from it into the
    dataset (pydicom's ``encapsulate_buffer``), so memory stays at a few tiles here too.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model = SyntheticTissue(width, height, seed=seed, mpp=mpp)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    paths: list[Path] = []
    for index, (downsample, level_w, level_h) in enumerate(pyramid_levels(width, height)):
        spacing_mm = mpp * downsample / 1000.0
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "SM"
        ds.Manufacturer = "slidebridge synthetic"
        ds.PatientID = f"SYNTHETIC-{seed}"
        ds.PatientName = "Synthetic^Slide"
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.ContainerIdentifier = f"synthetic-{seed}"
        ds.ImageType = (
            ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if index == 0 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        )
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.Rows = tile
        ds.Columns = tile
        ds.TotalPixelMatrixColumns = level_w
        ds.TotalPixelMatrixRows = level_h
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.NumberOfOpticalPaths = 1
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.ImagedVolumeWidth = width * mpp / 1000.0
        ds.ImagedVolumeHeight = height * mpp / 1000.0
        ds.ImagedVolumeDepth = 0.001
        measures = Dataset()
        measures.PixelSpacing = [spacing_mm, spacing_mm]  # (row spacing, column spacing) in mm
        measures.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
        optical_path = Dataset()
        optical_path.OpticalPathIdentifier = "1"
        optical_path.ObjectiveLensPower = round(10.0 / mpp)
        ds.OpticalPathSequence = [optical_path]

        path = folder / f"level-{index}.dcm"
        with tempfile.TemporaryFile() as spool:
            frames: list[BufferedIOBase] = []
            for pixels in model.tiles(downsample, level_w, level_h, tile):
                frame = imagecodecs.jpeg8_encode(pixels, level=quality, subsampling="422")
                frames.append(_FrameWindow(spool, spool.tell(), len(frame)))
                spool.write(frame)
            spool.flush()
            ds.NumberOfFrames = len(frames)
            ds.PixelData = encapsulate_buffer(frames, has_bot=False)
            ds["PixelData"].VR = "OB"
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_synthetic_dicom_zip(
    path: Path, width: int, height: int, *, seed: int = 0, mpp: float = 0.25, tile: int = 256
) -> Path:
    """Write the DICOM series of ``write_synthetic_dicom`` as one zip file at ``path``."""
    with tempfile.TemporaryDirectory() as tmp:
        files = write_synthetic_dicom(Path(tmp) / "series", width, height, seed=seed, mpp=mpp, tile=tile)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
            for file in files:
                archive.write(file, arcname=f"series/{file.name}")
    return path
