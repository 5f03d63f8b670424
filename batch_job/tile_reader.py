"""One slide's tile reader: regions of JPEG-tiled TIFF levels assembled from the file, OpenSlide elsewhere.

OpenSlide's ``read_region`` decodes a JPEG TIFF tile with libjpeg-turbo too, but around that it looks
the tile up in its cache, paints it onto a cairo surface, converts premultiplied ARGB to RGBA, and we
then drop the alpha channel: about 8 times the CPU of the decode alone (1.6 ms against 0.2 ms for a
256 px tile here). ``TileReader`` does what OpenSlide does without the detour: it reads the TIFF
tiles a region covers (one ``os.pread`` each), decodes them with ``imagecodecs.jpeg8_decode``
(libjpeg-turbo), keeps the decoded tiles in a small cache (the classifier grid is read row by row,
so neighbouring regions share tiles) and copies the region out of them. A region that is exactly one
TIFF tile is decoded straight into the output array, without the cache.

The pixels are the same as OpenSlide's:

- the decode is the same: OpenSlide (4.x, ``openslide-decode-tiff.c``) loads the TIFF's JPEGTables,
  reads the tile's bytes, forces the JPEG colour space from the TIFF photometric tag (YCbCr → YCbCr,
  RGB → RGB, whatever the JPEG markers say, for Aperio) and decodes with libjpeg's defaults (integer
  DCT, fancy upsampling); we do the same;
- the placement is a plain copy where OpenSlide's is: its aperio and generic-tiff backends map the
  level-0 (x, y) of ``read_region`` to ``x / downsample`` level px (in double precision), and its
  grid (``openslide-grid.c``, ``simple_paint_region``) has cairo paint each tile translated by the
  region's offset within its first tile. A whole-number offset is a pixel-for-pixel copy; anything
  else is resampled, so only regions starting on whole level pixels qualify: any position at level
  0, multiples of the downsample at a level whose downsample is a whole number, and a level's origin.
  Regions over 4096 px a side go to OpenSlide too (it paints them in pieces whose origins it
  rounds to level-0 px);
- past the image (the part of an edge tile beyond the level's size, which OpenSlide clips, and
  beyond the last tile) OpenSlide leaves the region transparent, which ``rgba_to_rgb`` composites on
  white: we paint it white (255).

``tests/unit/test_tile_reader.py`` checks equality, including whole production grids.

Everything else goes through OpenSlide, one spec at a time: DICOM and other formats, other TIFF
vendors (whose levels are not one TIFF directory read tile by tile from (0, 0)), other compressions
(JPEG 2000, LZW, ...), regions that do not start on whole level pixels, and regions covering a
missing (zero-length) tile or, in Aperio files, a tile of a coarser level over one (OpenSlide paints
those from the finer level). A region with a tile whose bytes fail to decode is read through
OpenSlide too, so a damaged tile fails (or not) exactly as it would there; so is one with a tile
whose data does not end with the JPEG end marker, which libjpeg only warns about (and imagecodecs
then decodes with grey fill) while OpenSlide treats the warning as an error.

One difference remains: a tile whose compressed data is damaged inside yet ends with the end marker
(say, cut short mid-scan and terminated) makes libjpeg warn ("Corrupt JPEG data: ..."). OpenSlide
fails the read; imagecodecs cannot report warnings, so this reader returns what libjpeg recovered.

Memory: the decoded-tile cache holds at most ``cache_bytes`` per reader (default 32 MiB, as much as
OpenSlide's own tile cache, which this path leaves nearly empty): 170 tiles of 256 × 256 px, two
tile rows of a level up to 21 000 px wide. Least recently used tiles go first, which for a grid read
row by row keeps the rows the next grid row shares with this one (where they fit).
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import imagecodecs
import numpy as np
import openslide
import tifffile
from numpy.typing import NDArray
from PIL import Image

from batch_job.slide import SlideFormat, TileSpec, open_slide, rgba_to_rgb, sniff_format
from slidebridge.errors import UnreadableSlideError, UnsupportedFormatError

logger = logging.getLogger(__name__)

# OpenSlide backends whose level L is one tiled TIFF directory read tile by tile from its (0, 0) with
# ``_openslide_tiff_read_tile``. Others place tiles themselves (Ventana overlaps, Philips sparse
# tiles, Leica/Trestle/NDPI layouts) and always go through OpenSlide.
_DIRECT_VENDORS = frozenset({"aperio", "generic-tiff"})
_TIFF_JPEG = 7  # "new-style" JPEG; 6 (old-style) is left to OpenSlide/libtiff
_PHOTOMETRIC_COLORSPACE = {2: "RGB", 6: "YCBCR"}  # TIFF photometric → the JPEG colour space OpenSlide forces
_PLANAR_CONTIG = 1
_JPEG_EOI = b"\xff\xd9"
# OpenSlide paints regions larger than this (a side, level px) in pieces whose level-0 origins it
# truncates to whole pixels (``openslide_read_region``): off whole level pixels where the downsample is not.
_MAX_REGION_PX = 4096
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024  # per reader: OpenSlide's default tile cache is as large


@dataclass(frozen=True)
class JpegLevel:
    """A pyramid level stored as a JPEG-tiled TIFF directory: where each tile's bytes are."""

    width: int  # level px
    height: int
    tile_width: int
    tile_height: int
    downsample: float  # OpenSlide's level downsample (level-0 px per level px)
    offsets: NDArray[np.int64]  # per tile, row-major
    bytecounts: NDArray[np.int64]
    tables: bytes | None  # the TIFF's JPEGTables (abbreviated table specification), if any
    colorspace: str  # "YCBCR" or "RGB", from the photometric tag
    missing: frozenset[int] = frozenset()  # tiles OpenSlide does not decode from their own bytes

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_width)

    def origin(self, spec: TileSpec) -> tuple[int, int] | None:
        """Level px (left, top) of the spec's region where OpenSlide copies it pixel for pixel, else None.

        OpenSlide maps level-0 (x, y) to ``x / downsample`` level px; anything but a whole number
        there is resampled by cairo (always a whole number at level 0)."""
        if not (0 < spec.read_width <= _MAX_REGION_PX and 0 < spec.read_height <= _MAX_REGION_PX):
            return None
        if spec.x < 0 or spec.y < 0:
            return None
        left, top = spec.x / self.downsample, spec.y / self.downsample
        if not (left.is_integer() and top.is_integer()):
            return None
        return int(left), int(top)

    def covering(self, left: int, top: int, width: int, height: int) -> tuple[range, range]:
        """(rows, columns) of the TIFF tiles under the level region's part inside the image."""
        right, bottom = min(left + width, self.width), min(top + height, self.height)
        if right <= left or bottom <= top:
            return range(0), range(0)
        return (
            range(top // self.tile_height, (bottom - 1) // self.tile_height + 1),
            range(left // self.tile_width, (right - 1) // self.tile_width + 1),
        )

    def decodable(self, index: int) -> bool:
        """Whether OpenSlide decodes tile ``index`` from its own bytes (so may we)."""
        return index < self.bytecounts.size and self.bytecounts[index] > 0 and index not in self.missing

    def tile_index(self, spec: TileSpec) -> int | None:
        """The TIFF tile that is exactly this spec's rectangle, inside the image, or None."""
        if spec.read_width != self.tile_width or spec.read_height != self.tile_height:
            return None
        origin = self.origin(spec)
        if origin is None:
            return None
        col, col_rest = divmod(origin[0], self.tile_width)
        row, row_rest = divmod(origin[1], self.tile_height)
        if col_rest or row_rest:
            return None
        # The part of a tile running past the image is clipped (left to the region path).
        if (col + 1) * self.tile_width > self.width or (row + 1) * self.tile_height > self.height:
            return None
        index = row * self.tiles_across + col
        return index if self.decodable(index) else None


def _aperio_missing(pages: list[tifffile.TiffPage]) -> list[frozenset[int]]:
    """Per level, the tiles OpenSlide's aperio backend paints from the level above instead of decoding.

    Some Aperio files have zero-length tiles (an encoder bug), and the tiles of the next level that
    cover one are often corrupt too: OpenSlide marks those missing as well, level after level
    (``openslide-vendor-aperio.c``, ``propagate_missing_tile``), whatever their bytes."""
    missing: list[frozenset[int]] = []
    for level, page in enumerate(pages):
        across, down = -(-page.imagewidth // page.tilewidth), -(-page.imagelength // page.tilelength)
        found = {int(index) for index in np.flatnonzero(np.asarray(page.databytecounts) == 0)}
        if level:
            above = pages[level - 1]
            above_across = -(-above.imagewidth // above.tilewidth)
            above_down = -(-above.imagelength // above.tilelength)
            # C's round() (half away from zero) of the tile-count ratio, then integer division.
            concat_x = max(1, math.floor(above_across / across + 0.5))
            concat_y = max(1, math.floor(above_down / down + 0.5))
            for index in missing[-1]:
                row, col = divmod(index, above_across)
                found.add((row // concat_y) * across + col // concat_x)
        missing.append(frozenset(found))
    return missing


def jpeg_levels(path: Path, slide: openslide.OpenSlide) -> dict[int, JpegLevel]:
    """The slide's levels that ``TileReader`` may read directly, by OpenSlide level index.

    Each OpenSlide level is matched to the one tiled TIFF directory of its size; a level with no or
    more than one candidate, or one OpenSlide may read differently, is left out."""
    try:
        if sniff_format(path) is not SlideFormat.TIFF:
            return {}
    except (OSError, UnsupportedFormatError):
        return {}
    if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) not in _DIRECT_VENDORS:
        return {}
    levels: dict[int, JpegLevel] = {}
    try:
        with tifffile.TiffFile(path) as tif:
            tiled = [page for page in tif.pages if isinstance(page, tifffile.TiffPage) and page.is_tiled]
            by_level: list[tifffile.TiffPage | None] = []
            for width, height in slide.level_dimensions:
                matches = [page for page in tiled if (page.imagewidth, page.imagelength) == (width, height)]
                by_level.append(matches[0] if len(matches) == 1 else None)
            missing: list[frozenset[int]] = [frozenset()] * len(by_level)
            if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) == "aperio":
                known = [page for page in by_level if page is not None]
                if len(known) != len(by_level):
                    return {}  # which tiles OpenSlide paints from elsewhere cannot be worked out
                missing = _aperio_missing(known)
            for level, page in enumerate(by_level):
                if page is None:
                    continue
                width, height = page.imagewidth, page.imagelength
                colorspace = _PHOTOMETRIC_COLORSPACE.get(int(page.photometric))
                if (
                    colorspace is None
                    or int(page.compression) != _TIFF_JPEG
                    or int(page.planarconfig) != _PLANAR_CONTIG
                    or page.bitspersample != 8
                    or page.samplesperpixel != 3
                    or page.imagedepth != 1
                    or page.tiledepth != 1
                ):
                    continue
                levels[level] = JpegLevel(
                    width=width,
                    height=height,
                    tile_width=page.tilewidth,
                    tile_height=page.tilelength,
                    downsample=float(slide.level_downsamples[level]),
                    offsets=np.asarray(page.dataoffsets, dtype=np.int64),
                    bytecounts=np.asarray(page.databytecounts, dtype=np.int64),
                    tables=page.jpegtables or None,
                    colorspace=colorspace,
                    missing=missing[level],
                )
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        # OpenSlide opened it, so it reads every tile: lose the shortcut, not the slide.
        logger.warning("reading tiles through OpenSlide only: cannot parse the TIFF (%s)", exc)
        return {}
    return levels


def fit_to_tile(rgb: NDArray[np.uint8], spec: TileSpec, tile_px: int) -> NDArray[np.uint8]:
    """A region read for ``spec`` resized to ``tile_px × tile_px``."""
    if rgb.shape[:2] == (tile_px, tile_px):
        return rgb
    # BOX (area average) when shrinking avoids aliasing; bilinear when a coarse slide must be enlarged.
    shrinking = spec.read_width >= tile_px and spec.read_height >= tile_px
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize((tile_px, tile_px), method))


def read_tile(slide: openslide.OpenSlide, spec: TileSpec, tile_px: int) -> NDArray[np.uint8]:
    """One tile through OpenSlide, as ``tile_px × tile_px × 3`` RGB (area past the slide edge is white)."""
    try:
        region = slide.read_region((spec.x, spec.y), spec.level, (spec.read_width, spec.read_height))
    except openslide.OpenSlideError as exc:
        raise UnreadableSlideError(f"cannot read the slide at level-0 ({spec.x}, {spec.y}): {exc}") from exc
    return fit_to_tile(rgba_to_rgb(region), spec, tile_px)


class TileReader:
    """Reads tiles of one slide, in one process (open one per worker process; not thread-safe for
    OpenSlide's sake). ``direct`` and ``fallback`` count the specs read each way, ``decoded`` the
    TIFF tiles decoded; decoded tiles are cached up to ``cache_bytes`` (0: no cache)."""

    def __init__(self, path: Path, *, direct: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path = path
        self.slide = open_slide(path)
        self.direct = 0
        self.fallback = 0
        self.decoded = 0
        self.cache_limit = max(0, cache_bytes)
        self._cache: OrderedDict[tuple[int, int], NDArray[np.uint8]] = OrderedDict()  # (level, tile) → RGB
        self._cached_bytes = 0
        self._scratch: NDArray[np.uint8] | None = None  # a region read for a batch, before resizing
        self._fd: int | None = None
        self._levels: dict[int, JpegLevel] = {}
        if direct:
            try:
                self._levels = jpeg_levels(path, self.slide)
                if self._levels:
                    self._fd = os.open(path, os.O_RDONLY)
            except BaseException:
                self.close()
                raise

    @property
    def direct_levels(self) -> dict[int, JpegLevel]:
        return dict(self._levels)

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded tiles held now (never more than ``cache_limit``)."""
        return self._cached_bytes

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._cache.clear()
        self._cached_bytes = 0
        self.slide.close()

    def __enter__(self) -> TileReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def is_direct(self, spec: TileSpec) -> bool:
        """Whether ``spec`` is read straight from the TIFF (unless its bytes turn out unreadable)."""
        level = self._levels.get(spec.level)
        if level is None:
            return False
        origin = level.origin(spec)
        if origin is None:
            return False
        rows, cols = level.covering(*origin, spec.read_width, spec.read_height)
        across = level.tiles_across
        return all(level.decodable(row * across + col) for row in rows for col in cols)

    def _decode(self, level: JpegLevel, index: int, out: NDArray[np.uint8] | None) -> NDArray[np.uint8] | None:
        """TIFF tile ``index`` decoded (into ``out`` when given), or None when OpenSlide must judge it."""
        assert self._fd is not None
        size = int(level.bytecounts[index])
        try:
            data = os.pread(self._fd, size, int(level.offsets[index]))
            # libjpeg only warns about data that ends early, and imagecodecs decodes it anyway (grey
            # fill) where OpenSlide turns the warning into an error: leave such a tile to OpenSlide.
            if len(data) != size or not data.endswith(_JPEG_EOI):
                return None
            decoded: NDArray[np.uint8] = imagecodecs.jpeg8_decode(
                data, tables=level.tables, colorspace=level.colorspace, outcolorspace="RGB", out=out
            )
        except (OSError, ValueError, imagecodecs.Jpeg8Error) as exc:
            # Damaged or unexpected data (wrong size for ``out``): OpenSlide decides what it is.
            logger.debug("TIFF tile %d read through OpenSlide: %s", index, exc)
            return None
        if decoded.shape != (level.tile_height, level.tile_width, 3):
            return None
        self.decoded += 1
        return decoded

    def _cached_tile(self, level_no: int, level: JpegLevel, index: int) -> NDArray[np.uint8] | None:
        """Decoded TIFF tile ``index`` of the level, from the cache or the file (then cached).

        The array is valid until the next call: an evicted tile's memory takes the next decode."""
        key = (level_no, index)
        tile = self._cache.get(key)
        if tile is not None:
            self._cache.move_to_end(key)
            return tile
        size = level.tile_height * level.tile_width * 3
        spare: NDArray[np.uint8] | None = None
        if size <= self.cache_limit:
            while self._cached_bytes + size > self.cache_limit:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
                if old.nbytes == size:
                    spare = old.reshape(level.tile_height, level.tile_width, 3)
        tile = self._decode(level, index, spare)
        if tile is not None and size <= self.cache_limit:
            self._cache[key] = tile
            self._cached_bytes += tile.nbytes
        return tile

    def _read_direct(self, spec: TileSpec, dest: NDArray[np.uint8]) -> bool:
        """The spec's region (``read_height × read_width × 3``) into ``dest`` from the TIFF; False when it
        must go through OpenSlide (``dest`` may then hold anything)."""
        level = self._levels.get(spec.level)
        if level is None or self._fd is None:
            return False
        origin = level.origin(spec)
        if origin is None:
            return False
        index = level.tile_index(spec)
        if index is not None and (spec.level, index) not in self._cache:
            # Exactly one tile (an aligned grid): straight into the output, no copy, no cache.
            return self._decode(level, index, dest) is not None
        left, top = origin
        width, height = spec.read_width, spec.read_height
        rows, cols = level.covering(left, top, width, height)
        across = level.tiles_across
        if not all(level.decodable(row * across + col) for row in rows for col in cols):
            return False
        tile_w, tile_h = level.tile_width, level.tile_height
        right, bottom = min(left + width, level.width), min(top + height, level.height)
        for row in rows:
            y0, y1 = max(top, row * tile_h), min(bottom, (row + 1) * tile_h)
            for col in cols:
                tile = self._cached_tile(spec.level, level, row * across + col)
                if tile is None:
                    return False
                x0, x1 = max(left, col * tile_w), min(right, (col + 1) * tile_w)
                # Copied at once: the tile's memory may be reused by the next decode.
                dest[y0 - top : y1 - top, x0 - left : x1 - left] = tile[
                    y0 - row * tile_h : y1 - row * tile_h, x0 - col * tile_w : x1 - col * tile_w
                ]
        # Past the image OpenSlide leaves the region transparent, which rgba_to_rgb makes white.
        if right - left < width:
            dest[:, max(0, right - left) :] = 255
        if bottom - top < height:
            dest[max(0, bottom - top) :, :] = 255
        return True

    def read(self, spec: TileSpec, tile_px: int) -> NDArray[np.uint8]:
        """One tile as ``tile_px × tile_px × 3`` RGB, as ``read_tile`` would return it."""
        if spec.read_width > 0 and spec.read_height > 0:
            region = np.empty((spec.read_height, spec.read_width, 3), dtype=np.uint8)
            if self._read_direct(spec, region):
                self.direct += 1
                return fit_to_tile(region, spec, tile_px)
        self.fallback += 1
        return read_tile(self.slide, spec, tile_px)

    def read_batch(
        self, specs: Sequence[TileSpec], tile_px: int, *, out: NDArray[np.uint8] | None = None
    ) -> NDArray[np.uint8]:
        """``len(specs) × tile_px × tile_px × 3`` RGB, written into ``out`` when given."""
        shape = (len(specs), tile_px, tile_px, 3)
        if out is not None and (out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous uint8 array of shape {shape}")
        pixels = np.empty(shape, dtype=np.uint8) if out is None else out
        for i, spec in enumerate(specs):
            if spec.read_width == tile_px and spec.read_height == tile_px:
                # Straight into the batch: no intermediate region, no copy.
                if self._read_direct(spec, pixels[i]):
                    self.direct += 1
                    continue
            elif spec.read_width > 0 and spec.read_height > 0:
                region_shape = (spec.read_height, spec.read_width, 3)
                if self._scratch is None or self._scratch.shape != region_shape:
                    self._scratch = np.empty(region_shape, dtype=np.uint8)
                if self._read_direct(spec, self._scratch):
                    self.direct += 1
                    pixels[i] = fit_to_tile(self._scratch, spec, tile_px)  # resized: a new array, then copied
                    continue
            self.fallback += 1
            pixels[i] = read_tile(self.slide, spec, tile_px)
        return pixels
