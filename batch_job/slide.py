"""Slides: recognise the format, prepare the files, open with OpenSlide, find tissue, lay the tile grid.

Coordinate frames (as in tiatoolbox): *level-0* pixels are the slide's full resolution, origin at
the top-left, x right, y down; OpenSlide's ``read_region`` takes its location in level-0 px and its
size in px of the level it reads. A *level-L* pixel spans ``level_downsamples[L]`` level-0 px. The
*mask* frame is the tissue mask's grid: one mask pixel spans ``TissueMask.downsample_x × _y`` level-0
px. Resolutions are in µm per pixel (mpp); areas in mm².
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import stat
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import openslide
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import disk, remove_small_holes, remove_small_objects

from slidebridge.errors import UnreadableSlideError, UnsupportedFormatError, UserInputError

logger = logging.getLogger(__name__)

_HEADER_BYTES = 132  # a DICOM file's 128-byte preamble plus "DICM"
# Bound on what a zipped DICOM series may unpack to (a 40× slide is a few GiB compressed).
MAX_ARCHIVE_BYTES = 64 * 1024**3
# Level pixels per strip of ``read_downsampled``. Fixed, not derived from the thread count, so that
# the strip seams (and so the pixels) do not depend on the machine; up to 4 strips are in flight.
_STRIP_PIXELS = 2 * 1024 * 1024
# Pixels per strip of the HSV conversion in tissue detection (see ``_saturation_and_brightness``).
_HSV_STRIP_PIXELS = 1024 * 1024


class SlideFormat(StrEnum):
    TIFF = "tiff"  # TIFF or BigTIFF: SVS, NDPI, generic pyramidal TIFF, ...
    DICOM = "dicom"  # a DICOM Part 10 file (one instance of a WSI series)
    DICOM_ZIP = "dicom-zip"  # a zip archive holding a DICOM WSI series


# What we can name when refusing a file: leading bytes → description.
_KNOWN_MAGIC: list[tuple[bytes, str]] = [
    (b"\x89PNG\r\n\x1a\n", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000 image"),
    (b"\xffO\xffQ", "JPEG 2000 codestream"),
    (b"GIF87a", "GIF image"),
    (b"GIF89a", "GIF image"),
    (b"BM", "BMP image"),
    (b"%PDF", "PDF document"),
    (b"\x1f\x8b", "gzip archive"),
    (b"BZh", "bzip2 archive"),
    (b"\xfd7zXZ\x00", "xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "7-Zip archive"),
    (b"Rar!\x1a\x07", "RAR archive"),
    (b"(\xb5/\xfd", "zstd archive"),
    (b"PK\x05\x06", "empty ZIP archive"),
]


def _describe_unknown(head: bytes) -> str:
    if not head:
        return "empty file"
    for magic, name in _KNOWN_MAGIC:
        if head.startswith(magic):
            return f"{name} (magic {head[:4].hex()})"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return f"WebP image (magic {head[:4].hex()})"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "HTML document"
    if text.startswith(b"<?xml") or text.startswith(b"<error"):
        # e.g. an S3 error document served with status 200 by a misconfigured proxy
        return "XML document"
    if text.startswith((b"{", b"[")):
        return "JSON text"
    return f"unrecognised data (magic {head[:4].hex()})"


def _is_tiff(head: bytes) -> bool:
    return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_dicom(head: bytes) -> bool:
    return len(head) >= _HEADER_BYTES and head[128:132] == b"DICM"


def _zip_dicom_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The archive's regular-file members that start like a DICOM Part 10 file."""
    members = []
    for info in archive.infolist():
        mode = info.external_attr >> 16
        if info.is_dir() or stat.S_ISLNK(mode) or info.file_size < _HEADER_BYTES:
            continue
        with archive.open(info) as member:
            if _is_dicom(member.read(_HEADER_BYTES)):
                members.append(info)
    return members


def sniff_format(path: Path) -> SlideFormat:
    """The slide format from the file's leading bytes (presigned URLs carry no reliable extension).

    Raises UnsupportedFormatError naming what was found otherwise.
    """
    with path.open("rb") as file:
        head = file.read(_HEADER_BYTES)
    if _is_tiff(head):
        return SlideFormat.TIFF
    if _is_dicom(head):
        return SlideFormat.DICOM
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = [info.filename for info in archive.infolist() if not info.is_dir()]
                if _zip_dicom_members(archive):
                    return SlideFormat.DICOM_ZIP
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
            # RuntimeError: encrypted member; NotImplementedError: unsupported compression method
            raise UnsupportedFormatError(f"unsupported format: unreadable ZIP archive ({exc})") from exc
        found = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "no files"
        raise UnsupportedFormatError(f"unsupported format: ZIP archive without DICOM files ({found})")
    raise UnsupportedFormatError(f"unsupported format: {_describe_unknown(head)}")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _extract_dicom_zip(archive_path: Path, folder: Path, first_index: int, max_bytes: int) -> int:
    """Extract the DICOM members of a zip into ``folder``; return how many were written.

    Safe by construction: members are written under generated names (``00000.dcm`` ...), so member
    names (absolute, ``..``, links) never become paths, and the bytes actually written are counted
    against ``max_bytes`` (declared sizes can lie).
    """
    written = 0
    total = 0
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = _zip_dicom_members(archive)
            if sum(info.file_size for info in members) > max_bytes:
                raise UserInputError(f"ZIP archive unpacks to more than {max_bytes} bytes", code="ARCHIVE_TOO_LARGE")
            for info in members:
                target = folder / f"{first_index + written:05d}.dcm"
                with archive.open(info) as source, target.open("wb") as sink:
                    while chunk := source.read(1024 * 1024):
                        total += len(chunk)
                        if total > max_bytes:
                            raise UserInputError(
                                f"ZIP archive unpacks to more than {max_bytes} bytes", code="ARCHIVE_TOO_LARGE"
                            )
                        sink.write(chunk)
                written += 1
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError) as exc:
        raise UnreadableSlideError(f"cannot extract the ZIP archive: {exc}") from exc
    return written


def prepare_slide(paths: list[Path], workdir: Path, *, max_archive_bytes: int = MAX_ARCHIVE_BYTES) -> Path:
    """Turn downloaded files into the one path to give OpenSlide.

    - one TIFF: that file;
    - DICOM files and/or zipped DICOM series: gathered into one folder of ``workdir`` (OpenSlide
      opens a DICOM series through any one file of its folder and finds the others by
      SeriesInstanceUID); returns a file of that folder.
    """
    if not paths:
        raise UserInputError("no slide files were given", code="MISSING_INPUT")
    formats = [sniff_format(path) for path in paths]
    if SlideFormat.TIFF in formats:
        if len(paths) > 1:
            raise UnsupportedFormatError(
                f"unsupported format: a TIFF slide must come as a single file, got {len(paths)} files"
            )
        return paths[0]
    folder = workdir / "dicom"
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for path, fmt in zip(paths, formats, strict=True):
        if fmt is SlideFormat.DICOM:
            _link_or_copy(path, folder / f"{count:05d}.dcm")
            count += 1
        else:
            count += _extract_dicom_zip(path, folder, count, max_archive_bytes - _folder_bytes(folder))
    logger.info("prepared a DICOM series of %d file(s)", count)
    return _whole_slide_file(folder)


def _whole_slide_file(folder: Path) -> Path:
    """The first file of ``folder`` that is a VL Whole Slide Microscopy image.

    OpenSlide recognises a DICOM slide only through such a file (and then gathers its series from
    the folder); an export may put a DICOMDIR, a structured report or a secondary capture first.
    pydicom reads only each file's 132-byte preamble and File Meta group, not the pixel data.
    """
    # Imported here: pydicom takes a quarter of a second to import, and the tile workers, which
    # import this module, never need it.
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415
    from pydicom.filereader import read_file_meta_info  # noqa: PLC0415
    from pydicom.uid import VLWholeSlideMicroscopyImageStorage  # noqa: PLC0415

    others: list[str] = []
    for path in sorted(folder.iterdir()):
        try:
            sop_class = read_file_meta_info(path).get("MediaStorageSOPClassUID")
        except (InvalidDicomError, OSError, ValueError, EOFError):
            sop_class = None
        if sop_class == VLWholeSlideMicroscopyImageStorage:
            return path
        others.append(getattr(sop_class, "name", None) or str(sop_class or "no SOP class"))
    kinds = ", ".join(sorted(set(others))[:3])
    raise UnsupportedFormatError(
        f"unsupported format: DICOM files, but none is a whole-slide microscopy image (found: {kinds})"
    )


def _folder_bytes(folder: Path) -> int:
    return sum(entry.stat().st_size for entry in folder.iterdir())


def open_slide(path: Path) -> openslide.OpenSlide:
    """Open with OpenSlide; UnreadableSlideError (a USER_ERROR) when it can't."""
    try:
        slide = openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise UnreadableSlideError("OpenSlide does not recognise the slide (unsupported or damaged file)") from exc
    except (openslide.OpenSlideError, OSError) as exc:
        raise UnreadableSlideError(f"OpenSlide cannot read the slide: {exc}") from exc
    width, height = slide.dimensions
    if width <= 0 or height <= 0 or slide.level_count < 1:
        slide.close()
        raise UnreadableSlideError(f"the slide has no image data ({width}x{height}, {slide.level_count} levels)")
    return slide


def slide_mpp(slide: openslide.OpenSlide) -> tuple[float, float]:
    """(mpp_x, mpp_y): µm per level-0 pixel. UserInputError MISSING_RESOLUTION when not recorded."""
    values = []
    for name in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            value = float(slide.properties[name])
        except (KeyError, ValueError):
            value = math.nan
        values.append(value)
    mpp_x, mpp_y = values
    # A resolution outside 0.01-100 µm/px is not a microscope scan: treat it as missing.
    if not all(0.01 <= v <= 100.0 for v in values):
        raise UserInputError("the slide does not record its resolution (microns per pixel)", code="MISSING_RESOLUTION")
    return mpp_x, mpp_y


# --- low-resolution images -----------------------------------------------------------------------

# How much coarser than needed a level may be and still be read from (a tile is then up to 1 % off
# its nominal µm/px, as the rounding of tile sides already allows).
LEVEL_DOWNSAMPLE_TOLERANCE = 0.01


def rgba_to_rgb(image: Image.Image) -> NDArray[np.uint8]:
    """RGB array of an OpenSlide RGBA region, composited on white.

    OpenSlide returns transparent pixels outside the scanned area and past the slide edge; taken as
    RGB they would be black, which every stain measure reads as dense tissue.
    """
    rgba = np.asarray(image)
    if rgba.ndim == 3 and rgba.shape[2] == 4:
        alpha = rgba[..., 3:4]
        if alpha.min() == 255:
            opaque: NDArray[np.uint8] = np.ascontiguousarray(rgba[..., :3])
            return opaque
        a = alpha.astype(np.float32) / 255.0
        # OpenSlide's RGBA is not premultiplied: blend colour and white by alpha.
        blended = rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
        composited: NDArray[np.uint8] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return composited
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))


def read_downsampled(slide: openslide.OpenSlide, downsample: float) -> NDArray[np.uint8]:
    """The whole slide at ``downsample`` level-0 px per output px, as RGB (rows = y).

    Read from the best pyramid level in horizontal strips and shrunk strip by strip, so memory stays
    bounded even for a slide without a pyramid (``get_thumbnail`` would read the whole level).
    Strips are read by a few threads at once: OpenSlide's C code decodes without the GIL (ctypes
    releases it) and its handles are thread-safe, so a 16x level of a 100000 px slide (31 Mpx)
    decodes on every core instead of one.
    """
    width, height = slide.dimensions
    out_w, out_h = max(1, math.ceil(width / downsample)), max(1, math.ceil(height / downsample))
    # The tolerance as in tile_geometry: a "×16" level of 16.003 still serves a ×16 read.
    level = slide.get_best_level_for_downsample(downsample * (1 + LEVEL_DOWNSAMPLE_TOLERANCE))
    level_downsample = slide.level_downsamples[level]
    scale = downsample / level_downsample  # level px per output px (≥ 0.99 for a sensible level)
    read_w = max(1, round(out_w * scale))
    threads = _strip_threads()
    rows_per_strip = max(1, int(_STRIP_PIXELS / read_w / max(scale, 1.0)))
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)

    def read_strip(row0: int) -> None:
        row1 = min(out_h, row0 + rows_per_strip)
        y0 = round(row0 * downsample)  # level-0 px
        read_h = max(1, round((row1 - row0) * scale))
        region = slide.read_region((0, y0), level, (read_w, read_h))
        strip = Image.fromarray(rgba_to_rgb(region))
        out[row0:row1] = np.asarray(strip.resize((out_w, row1 - row0), Image.Resampling.BOX))

    starts = range(0, out_h, rows_per_strip)
    if threads == 1 or len(starts) == 1:
        for row0 in starts:
            read_strip(row0)
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="strip") as pool:
            # list(): re-raise the first strip's error here, after every thread has stopped.
            list(pool.map(read_strip, starts))
    return out


def _strip_threads() -> int:
    """Threads for strip reads: one per core this process may use, at most 4 (decoding a level of a
    few tens of Mpx does not gain from more, and each thread holds a strip)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


# --- tissue ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TissueMask:
    """Detected tissue on a low-resolution grid; ``mask[r, c]`` covers level-0 px
    ``[c·downsample_x, (c+1)·downsample_x) × [r·downsample_y, (r+1)·downsample_y)``."""

    mask: NDArray[np.bool_]
    downsample_x: float  # level-0 px per mask px
    downsample_y: float
    mpp_x: float  # of level 0
    mpp_y: float

    @property
    def pixel_mm2(self) -> float:
        """Area of one mask pixel."""
        return self.downsample_x * self.mpp_x * self.downsample_y * self.mpp_y / 1e6

    @property
    def area_mm2(self) -> float:
        """Area of the detected tissue."""
        return float(self.mask.sum()) * self.pixel_mm2

    def fractions(
        self, x: NDArray[np.float64], y: NDArray[np.float64], width: float, height: float
    ) -> NDArray[np.float64]:
        """Share of tissue in each level-0 rectangle (x, y, width, height); area past the slide counts
        as no tissue. Mask pixels count when their centre lies inside the rectangle."""
        rows, cols = self.mask.shape
        integral = np.zeros((rows + 1, cols + 1), dtype=np.int64)
        integral[1:, 1:] = self.mask.cumsum(axis=0).cumsum(axis=1)
        # Mask pixel c has its centre at level-0 x = (c + 0.5)·downsample_x.
        c0 = np.ceil(x / self.downsample_x - 0.5).astype(np.int64)
        c1 = np.ceil((x + width) / self.downsample_x - 0.5).astype(np.int64)
        r0 = np.ceil(y / self.downsample_y - 0.5).astype(np.int64)
        r1 = np.ceil((y + height) / self.downsample_y - 0.5).astype(np.int64)
        area = np.maximum((c1 - c0) * (r1 - r0), 1)
        c0, c1 = np.clip(c0, 0, cols), np.clip(c1, 0, cols)
        r0, r1 = np.clip(r0, 0, rows), np.clip(r1, 0, rows)
        inside = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
        result: NDArray[np.float64] = inside / area
        return result


def _saturation_and_brightness(
    rgb: NDArray[np.uint8], *, min_value: float
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """HSV saturation of an RGB image, and where its HSV value exceeds ``min_value``.

    scikit-image's ``rgb2hsv`` on strips of rows: on the whole image it holds several float64 copies
    at once (about 100 bytes per pixel, 0.8 GB for the mask of a 100 000 × 80 000 px slide); strip
    by strip only the saturation stays (8 bytes per pixel), with the same values.
    """
    height, width = rgb.shape[:2]
    saturation = np.empty((height, width), dtype=np.float64)
    bright = np.empty((height, width), dtype=bool)
    rows = max(1, _HSV_STRIP_PIXELS // max(width, 1))
    for row0 in range(0, height, rows):
        hsv = rgb2hsv(rgb[row0 : row0 + rows])
        saturation[row0 : row0 + rows] = hsv[..., 1]
        bright[row0 : row0 + rows] = hsv[..., 2] > min_value
    return saturation, bright


def detect_tissue(
    slide: openslide.OpenSlide,
    *,
    target_mpp: float = 8.0,
    min_saturation: float = 0.07,
    min_object_mm2: float = 0.01,
    min_hole_mm2: float = 0.01,
) -> TissueMask:
    """Tissue mask at about ``target_mpp`` µm/px: Otsu threshold on HSV saturation, then morphology.

    Stained tissue is saturated, glass is grey-white. Otsu separates the two when both are present;
    ``min_saturation`` keeps an all-glass or all-tissue image from being split along noise. Dark
    debris and pen marks (value < 0.15) are not tissue. Objects and holes smaller than the given
    areas are dropped/filled after an opening and closing with a 2-pixel disk.
    """
    mpp_x, mpp_y = slide_mpp(slide)
    width, height = slide.dimensions
    # Mask pixels square in level-0 px, at least target_mpp µm along both axes; never finer than
    # level 0, and the mask at most ~4096 px wide.
    downsample = max(1.0, target_mpp / min(mpp_x, mpp_y), max(width, height) / 4096.0)
    saturation, bright = _saturation_and_brightness(read_downsampled(slide, downsample), min_value=0.15)
    try:
        threshold = max(float(threshold_otsu(saturation)), min_saturation)
    except ValueError:  # a single-valued image
        threshold = min_saturation
    mask = (saturation > threshold) & bright
    structure = disk(2)
    mask = ndimage.binary_opening(mask, structure=structure)
    mask = ndimage.binary_closing(mask, structure=structure, border_value=0)
    pixel_mm2 = downsample * mpp_x * downsample * mpp_y / 1e6
    mask = remove_small_objects(mask, max_size=max(0, int(min_object_mm2 / pixel_mm2)))
    mask = remove_small_holes(mask, max_size=max(0, int(min_hole_mm2 / pixel_mm2)))
    result = TissueMask(mask=mask, downsample_x=downsample, downsample_y=downsample, mpp_x=mpp_x, mpp_y=mpp_y)
    logger.info(
        "tissue: %.1f mm² (%.1f %% of the slide) at %.1f µm/px",
        result.area_mm2,
        100.0 * float(mask.mean()),
        downsample * mpp_x,
    )
    return result


# --- tile grid ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TileGeometry:
    """How a classifier tile maps onto the slide: ``tile_width × tile_height`` level-0 px, read from
    pyramid level ``level`` as ``read_width × read_height`` px of that level."""

    tile_width: int
    tile_height: int
    level: int
    read_width: int
    read_height: int


@dataclass(frozen=True, slots=True)
class TileSpec:
    """One tile of the grid: column/row in the grid, and ``x, y, width, height`` in level-0 px (the
    nominal tile, which may run past the slide edge). Read with
    ``read_region((x, y), level, (read_width, read_height))``, then resized to the classifier's size."""

    col: int
    row: int
    x: int
    y: int
    width: int
    height: int
    level: int
    read_width: int
    read_height: int
    tissue_fraction: float

    @property
    def centre(self) -> tuple[float, float]:
        """Level-0 (x, y) of the tile centre."""
        return self.x + self.width / 2.0, self.y + self.height / 2.0


def tile_geometry(slide: openslide.OpenSlide, *, tile_px: int, target_mpp: float) -> TileGeometry:
    """Tiles of ``tile_px`` px at ``target_mpp`` µm/px on this slide.

    A tile spans ``round(tile_px · target_mpp / mpp)`` level-0 px per axis (rounded so the grid tiles
    the slide exactly; the classifier's resolution is then off by well under 1 % for any real tile).
    It is read from the coarsest level that is at least as fine as needed, give or take
    ``LEVEL_DOWNSAMPLE_TOLERANCE``, as the matching number of that level's pixels.
    """
    if tile_px <= 0 or target_mpp <= 0:
        raise ValueError("tile_px and target_mpp must be positive")
    mpp_x, mpp_y = slide_mpp(slide)
    tile_w = max(1, round(tile_px * target_mpp / mpp_x))
    tile_h = max(1, round(tile_px * target_mpp / mpp_y))
    downsample = min(tile_w, tile_h) / tile_px  # level-0 px per classifier px, finer axis
    # A level-0 side that is not a multiple of 4 gives "×4" levels a downsample such as 4.0003
    # (46001 / 11500); without the tolerance OpenSlide's pick falls to the level below, and every
    # tile would be decoded from 16 times the pixels.
    level = slide.get_best_level_for_downsample(downsample * (1 + LEVEL_DOWNSAMPLE_TOLERANCE))
    level_downsample = slide.level_downsamples[level]
    return TileGeometry(
        tile_width=tile_w,
        tile_height=tile_h,
        level=level,
        read_width=max(1, round(tile_w / level_downsample)),
        read_height=max(1, round(tile_h / level_downsample)),
    )


def tile_grid(
    slide: openslide.OpenSlide,
    mask: TissueMask,
    *,
    tile_px: int,
    target_mpp: float,
    min_tissue_fraction: float,
) -> list[TileSpec]:
    """The tiles (see ``tile_geometry``) of a grid anchored at level-0 (0, 0) whose tissue fraction
    is at least ``min_tissue_fraction``, in row-major order."""
    geometry = tile_geometry(slide, tile_px=tile_px, target_mpp=target_mpp)
    tile_w, tile_h = geometry.tile_width, geometry.tile_height
    width, height = slide.dimensions
    cols, rows = math.ceil(width / tile_w), math.ceil(height / tile_h)
    grid_y, grid_x = np.mgrid[0:rows, 0:cols]
    fractions = mask.fractions(
        (grid_x * tile_w).ravel().astype(np.float64), (grid_y * tile_h).ravel().astype(np.float64), tile_w, tile_h
    ).reshape(rows, cols)
    specs = [
        TileSpec(
            col=int(col),
            row=int(row),
            x=int(col) * tile_w,
            y=int(row) * tile_h,
            width=tile_w,
            height=tile_h,
            level=geometry.level,
            read_width=geometry.read_width,
            read_height=geometry.read_height,
            tissue_fraction=float(fractions[row, col]),
        )
        for row, col in zip(*np.nonzero(fractions >= min_tissue_fraction), strict=True)
    ]
    logger.info(
        "tile grid: %d of %d tiles on tissue; %dx%d level-0 px each, read at level %d as %dx%d px",
        len(specs),
        rows * cols,
        tile_w,
        tile_h,
        geometry.level,
        geometry.read_width,
        geometry.read_height,
    )
    return specs
