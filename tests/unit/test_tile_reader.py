"""batch_job.tile_reader: regions of JPEG TIFF levels from the file, with OpenSlide's pixels; the rest via OpenSlide."""

from __future__ import annotations

import dataclasses
import struct
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from numpy.typing import NDArray
from PIL import Image

import batch_job.tiles as tiles_module
from batch_job.slide import TileSpec, detect_tissue, open_slide, tile_grid
from batch_job.tile_reader import TileReader, read_tile
from batch_job.tiles import read_tiles
from local.synthetic import write_synthetic_slide
from slidebridge.errors import UnreadableSlideError

TILE = 256
TILE_BYTES = TILE * TILE * 3  # one decoded TIFF tile
HE_TISSUE = {"tile_px": 224, "target_mpp": 1.0}  # the production classifier's tiles


def _spec(x: int, y: int, level: int = 0, read: int = TILE, downsample: float = 1.0) -> TileSpec:
    size = round(read * downsample)
    return TileSpec(
        col=0,
        row=0,
        x=x,
        y=y,
        width=size,
        height=size,
        level=level,
        read_width=read,
        read_height=read,
        tissue_fraction=1.0,
    )


def _openslide_pixels(path: Path, specs: list[TileSpec], tile_px: int) -> NDArray[np.uint8]:
    """What the pipeline read before: OpenSlide ``read_region`` per tile."""
    with open_slide(path) as slide:
        return np.stack([read_tile(slide, spec, tile_px) for spec in specs])


def _level_tiles(path: Path, level: int) -> list[TileSpec]:
    """Every tile of the TIFF grid of ``level``, edge tiles included."""
    with open_slide(path) as slide:
        width, height = slide.level_dimensions[level]
        downsample = slide.level_downsamples[level]
    return [
        _spec(round(col * TILE * downsample), round(row * TILE * downsample), level, downsample=downsample)
        for row in range(-(-height // TILE))
        for col in range(-(-width // TILE))
    ]


@pytest.fixture(scope="module")
def odd_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 px TIFF tiles on a slide whose sides are no multiple of 256: edge tiles at every level, and
    a level 1 of 751 × 501 px, so its downsample (3.997) is not a whole number."""
    path = tmp_path_factory.mktemp("odd") / "odd.svs"
    return write_synthetic_slide(path, 3001, 2003, seed=7, mpp=0.5, tile=TILE)


@pytest.fixture(scope="module")
def quarter_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 0.25 µm/px slide (40× scan), 6000 × 4500 px: levels 1500 × 1125 (downsample 4) and 375 × 282
    (downsample 15.98, not a whole number); no side a multiple of 256 or of the 896 px production tile."""
    path = tmp_path_factory.mktemp("quarter") / "quarter.svs"
    return write_synthetic_slide(path, 6000, 4500, seed=11, mpp=0.25, tile=TILE)


def _whole_grid(path: Path, *, tile_px: int, target_mpp: float) -> list[TileSpec]:
    """Every tile of the classifier grid, glass and edge tiles included."""
    with open_slide(path) as slide:
        return tile_grid(slide, detect_tissue(slide), tile_px=tile_px, target_mpp=target_mpp, min_tissue_fraction=0.0)


def _covered_tiles(reader: TileReader, specs: list[TileSpec]) -> set[tuple[int, int, int]]:
    """(level, row, column) of the TIFF tiles under the specs' regions."""
    covered = set()
    for spec in specs:
        level = reader.direct_levels[spec.level]
        origin = level.origin(spec)
        assert origin is not None
        rows, cols = level.covering(*origin, spec.read_width, spec.read_height)
        covered |= {(spec.level, row, col) for row in rows for col in cols}
    return covered


# --- hand-made JPEG TIFFs ----------------------------------------------------------------------------


def _gradient(height: int, width: int) -> NDArray[np.uint8]:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1).astype(np.uint8)


def _abbreviate(jpeg: bytes, component_ids: bytes | None) -> tuple[bytes, bytes]:
    """Split a JPEG into (tables-only stream, abbreviated image stream) as Aperio writes them: the
    quantisation and Huffman tables go to the TIFF's JPEGTables, APPn markers are dropped, and the
    component ids are optionally replaced (Aperio's RGB tiles carry neither an Adobe marker nor
    'R', 'G', 'B' ids, so libjpeg on its own would take them for YCbCr)."""
    tables, image, pos = [], [], 2
    while True:
        marker, length = jpeg[pos : pos + 2], struct.unpack(">H", jpeg[pos + 2 : pos + 4])[0]
        segment = bytearray(jpeg[pos : pos + 2 + length])
        if marker in (b"\xff\xc0", b"\xff\xda") and component_ids is not None:
            # Component ids: SOF0 has 10 bytes before the first and 3 per component; SOS 5 and 2.
            first, step = (10, 3) if marker == b"\xff\xc0" else (5, 2)
            for i, cid in enumerate(component_ids):
                segment[first + i * step] = cid
        if marker == b"\xff\xda":
            image.append(bytes(segment) + jpeg[pos + 2 + length :])
            break
        if marker in (b"\xff\xdb", b"\xff\xc4"):
            tables.append(bytes(segment))
        elif not b"\xff\xe0" <= marker <= b"\xff\xef":
            image.append(bytes(segment))
        pos += 2 + length
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(image)


def _jpeg_tiles(image: NDArray[np.uint8], *, rgb: bool) -> tuple[list[bytes], bytes]:
    """(abbreviated tiles in row-major order, their JPEG tables) of ``image`` cut into TILE px tiles."""
    height, width = image.shape[:2]
    tables, tiles = b"", []
    for row in range(-(-height // TILE)):
        for col in range(-(-width // TILE)):
            tile = np.full((TILE, TILE, 3), 255, np.uint8)
            part = image[row * TILE : (row + 1) * TILE, col * TILE : (col + 1) * TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            if rgb:
                jpeg = imagecodecs.jpeg8_encode(tile, level=80, colorspace="RGB", outcolorspace="RGB")
            else:
                jpeg = imagecodecs.jpeg8_encode(tile, level=80, subsampling="420")
            tables, data = _abbreviate(jpeg, b"\x00\x01\x02" if rgb else None)
            tiles.append(data)
    return tiles, tables


def _write_jpeg_tiff(
    path: Path,
    images: list[NDArray[np.uint8]],
    *,
    rgb: bool,
    damage: dict[tuple[int, int], bytes] | None = None,
) -> tuple[Path, list[list[bytes]], bytes]:
    """An Aperio-style TIFF with one level per image and JPEGTables; tiles coded as RGB (photometric
    RGB) or YCbCr 4:2:0 (photometric YCbCr). ``damage`` replaces the bytes of (level, tile) tiles."""
    levels = [_jpeg_tiles(image, rgb=rgb) for image in images]
    tables = levels[0][1]
    assert all(level_tables == tables for _, level_tables in levels)  # one quality: one set of tables
    tiles = [level_tiles for level_tiles, _ in levels]
    for (level, index), data in (damage or {}).items():
        tiles[level][index] = data
    height0, width0 = images[0].shape[:2]
    with tifffile.TiffWriter(path) as tif:
        for level, (image, level_tiles) in enumerate(zip(images, tiles, strict=True)):
            height, width = image.shape[:2]
            size = (
                f"{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE})"
                if level == 0
                else f"{width0}x{height0} -> {width}x{height}"
            )
            tif.write(
                iter(level_tiles),
                shape=(height, width, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                description=f"Aperio Image Library v12.0.15 \r\n{size} JPEG/RGB Q=80|AppMag = 20|MPP = 0.5",
                metadata=None,
                software=False,
                extratags=[(347, 7, len(tables), tables, True)],  # JPEGTables
            )
    if rgb:
        # tifffile records JPEG tiles as YCbCr; these are RGB-coded, as Aperio's are.
        with tifffile.TiffFile(path, mode="r+b") as tif:
            for page in tif.pages:
                page.tags["PhotometricInterpretation"].overwrite(2)
    return path, tiles, tables


# --- the direct path ---------------------------------------------------------------------------------


def test_tiles_on_the_tiff_grid_come_from_the_file_with_openslides_pixels(small_tiff_slide: Path):
    with TileReader(small_tiff_slide) as reader:
        assert sorted(reader.direct_levels) == [0, 1, 2]
        for level in (0, 1, 2):
            specs = _level_tiles(small_tiff_slide, level)
            inside = [spec for spec in specs if reader.is_direct(spec)]
            # 8192 × 6144 and 2048 × 1536 are whole tiles; 512 × 384 has a half row at the bottom,
            # read too (white past the image, as OpenSlide's transparency composites).
            assert len(inside) == {0: 32 * 24, 1: 8 * 6, 2: 2 * 2}[level] == len(specs)
            before = reader.direct
            pixels = reader.read_batch(inside, TILE)
            assert reader.direct - before == len(inside)
            np.testing.assert_array_equal(pixels, _openslide_pixels(small_tiff_slide, inside, TILE))
        assert reader.fallback == 0


@pytest.mark.parametrize("rgb", [False, True], ids=["ycbcr", "aperio-rgb"])
def test_jpeg_tables_and_the_photometric_colour_space_are_honoured(tmp_path: Path, rgb: bool):
    image = _gradient(512, 768)
    path, tiles, tables = _write_jpeg_tiff(tmp_path / "tables.svs", [image], rgb=rgb)
    specs = [_spec(col * TILE, row * TILE) for row in range(2) for col in range(3)]
    with TileReader(path) as reader:
        assert reader.direct_levels[0].tables == tables
        pixels = reader.read_batch(specs, TILE)
        assert reader.direct == len(specs)
    np.testing.assert_array_equal(pixels, _openslide_pixels(path, specs, TILE))
    assert np.abs(pixels[0].astype(int) - image[:TILE, :TILE]).mean() < 3  # and it is the picture
    if rgb:
        # Left to guess, libjpeg would decode these tiles as YCbCr: the TIFF's word has to win.
        guessed = imagecodecs.jpeg8_decode(tiles[0][0], tables=tables)
        assert np.abs(guessed.astype(int) - image[:TILE, :TILE]).mean() > 20


def test_truncated_and_missing_tiles_behave_as_in_openslide(tmp_path: Path):
    image = _gradient(512, 768)
    tiles, _ = _jpeg_tiles(image, rgb=False)
    damage = {(0, 1): tiles[1][:-600], (0, 2): b""}
    path, _, _ = _write_jpeg_tiff(tmp_path / "damaged.svs", [image], rgb=False, damage=damage)
    straddling = _spec(2 * TILE, TILE // 2)  # half over the missing tile, half over the one below it
    with TileReader(path) as reader:
        assert not reader.is_direct(_spec(2 * TILE, 0))  # no bytes at all
        # OpenSlide paints a missing tile transparent: white once composited.
        assert (reader.read(_spec(2 * TILE, 0), TILE) == 255).all()
        assert not reader.is_direct(straddling)
        half_missing = reader.read(straddling, TILE)
        assert (half_missing[: TILE // 2] == 255).all()
        assert (half_missing[TILE // 2 :] != 255).any()
        assert reader.direct == 0
        # libjpeg only warns about a tile that ends early; OpenSlide makes it an error, and so do we.
        with pytest.raises(UnreadableSlideError, match="Premature end of JPEG file"):
            reader.read(_spec(TILE, 0), TILE)
    # So for a region over part of it, whatever its other tiles (a fresh reader: OpenSlide's errors
    # stick to the handle).
    with TileReader(path) as reader, pytest.raises(UnreadableSlideError, match="Premature end of JPEG file"):
        reader.read(_spec(TILE // 2, 0, read=224), 224)
    with open_slide(path) as slide:
        np.testing.assert_array_equal(half_missing, read_tile(slide, straddling, TILE))
        with pytest.raises(UnreadableSlideError, match="Premature end of JPEG file"):
            read_tile(slide, _spec(TILE, 0), TILE)


def test_aperio_tiles_over_a_missing_tile_come_from_openslide(tmp_path: Path):
    # Level 0: 4 × 3 tiles, one of them empty; level 1: one tile over all of level 0. OpenSlide paints
    # that level-1 tile from level 0 (hole included) instead of decoding its own bytes.
    level0 = _gradient(768, 1024)
    level1 = np.asarray(Image.fromarray(level0).resize((256, 192), Image.Resampling.BOX))
    path, tiles, tables = _write_jpeg_tiff(tmp_path / "hole.svs", [level0, level1], rgb=False, damage={(0, 5): b""})
    spec = _spec(0, 0, level=1, downsample=4.0)
    part = _spec(32, 16, level=1, read=64, downsample=4.0)  # a level-1 region of 64 px over part of that tile
    with TileReader(path) as reader:
        assert reader.direct_levels[1].missing == {0}
        assert not reader.is_direct(spec)
        assert not reader.is_direct(part)
        pixels = reader.read(spec, TILE)
        part_pixels = reader.read(part, 64)
        assert (reader.direct, reader.fallback) == (0, 2)
    np.testing.assert_array_equal(pixels, _openslide_pixels(path, [spec], TILE)[0])
    np.testing.assert_array_equal(part_pixels, _openslide_pixels(path, [part], 64)[0])
    own_bytes = imagecodecs.jpeg8_decode(tiles[1][0], tables=tables)
    assert np.abs(own_bytes.astype(int) - pixels).max() > 50  # the hole shows: not the tile's own bytes


# --- regions assembled from the TIFF tiles they cover ---------------------------------------------


def _region_specs(small_tiff_slide: Path) -> list[tuple[TileSpec, int]]:
    """Specs off the TIFF grid, all on whole level pixels."""
    production = _whole_grid(small_tiff_slide, **HE_TISSUE)
    return [
        (_spec(TILE + 1, TILE), TILE),  # one pixel off the grid
        (_spec(TILE + 128, 2 * TILE + 128), TILE),  # half a tile off: four tiles
        (_spec(2 * TILE, 2 * TILE, read=224), 224),  # on a tile corner, smaller than a tile
        (_spec(2 * TILE, 2 * TILE, read=512), TILE),  # four whole tiles, shrunk to 256
        (_spec(5 * TILE, 4 * TILE, level=1, downsample=4.0), TILE),  # level-1 px (320, 256): no tile corner
        (_spec(8192 - 100, 6144 - 50), TILE),  # mostly past the bottom-right corner of the slide
        (_spec(8192, 0), TILE),  # wholly past the right edge: all white
        *((spec, 224) for spec in production[40:52]),  # the default classifier: 448 px at level 0 → 224
    ]


def test_regions_on_whole_level_pixels_are_assembled_from_the_tiff_with_openslides_pixels(small_tiff_slide: Path):
    cases = _region_specs(small_tiff_slide)
    with TileReader(small_tiff_slide) as reader, open_slide(small_tiff_slide) as slide:
        for spec, tile_px in cases:
            assert reader.is_direct(spec), spec
            np.testing.assert_array_equal(reader.read(spec, tile_px), read_tile(slide, spec, tile_px))
        assert (reader.direct, reader.fallback) == (len(cases), 0)
        assert (reader.read(_spec(8192, 0), TILE) == 255).all()


@pytest.mark.parametrize(
    "production", [pytest.param(False, id="0.5um-448px-level-0"), pytest.param(True, id="0.25um-224px-level-1")]
)
def test_the_production_grid_comes_from_the_tiff_with_openslides_pixels(
    small_tiff_slide: Path, quarter_slide: Path, production: bool
):
    path, (level, read) = (quarter_slide, (1, 224)) if production else (small_tiff_slide, (0, 448))
    specs = _whole_grid(path, **HE_TISSUE)
    assert {(spec.level, spec.read_width, spec.read_height) for spec in specs} == {(level, read, read)}
    with TileReader(path) as reader:
        assert all(reader.is_direct(spec) for spec in specs)
        regions = reader.read_batch(specs, read)  # as read, before resizing: every pixel counts
        # Read in grid order, each TIFF tile is decoded once: the cache holds the tile rows that the
        # next grid row shares with this one.
        assert reader.decoded == len(_covered_tiles(reader, specs))
        tiles = reader.read_batch(specs, 224)  # what the classifier gets
        assert (reader.direct, reader.fallback) == (2 * len(specs), 0)
    np.testing.assert_array_equal(regions, _openslide_pixels(path, specs, read))
    np.testing.assert_array_equal(tiles, _openslide_pixels(path, specs, 224))
    # The grid runs past the right and bottom edges: those tiles are white there, and compared above.
    with open_slide(path) as slide:
        width, height = slide.level_dimensions[level]
        downsample = round(slide.level_downsamples[level])
    last = specs[-1]
    assert 0 < width - last.x // downsample < read and 0 < height - last.y // downsample < read
    assert (regions[-1][:, width - last.x // downsample :] == 255).all()
    assert (regions[-1][height - last.y // downsample :, :] == 255).all()


@pytest.mark.parametrize("cache_tiles", [0, 3])
def test_the_tile_cache_stays_within_its_bound(small_tiff_slide: Path, cache_tiles: int):
    specs = _whole_grid(small_tiff_slide, **HE_TISSUE)[:60]  # 448 px regions over 2-3 × 2-3 tiles
    bound = cache_tiles * TILE_BYTES
    tiles = []
    with TileReader(small_tiff_slide, cache_bytes=bound) as reader:
        reader.read(specs[0], 224)  # a first read allocates what any read does (scratch, PIL)
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            for spec in specs:
                tiles.append(reader.read(spec, 224))
                assert reader.cached_bytes <= bound
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
        assert reader.direct == len(specs) + 1
        # Too small a cache to hold a row: tiles are decoded again, never held beyond the bound.
        assert reader.decoded > len(_covered_tiles(reader, specs))
    # Beyond the cache: the tiles kept here, one region and one decode in flight, and small change.
    assert peak <= bound + len(specs) * 224 * 224 * 3 + 448 * 448 * 3 + TILE_BYTES + 256 * 1024
    np.testing.assert_array_equal(np.stack(tiles), _openslide_pixels(small_tiff_slide, specs, 224))


# --- what goes through OpenSlide ---------------------------------------------------------------------


def test_regions_off_whole_level_pixels_go_through_openslide(small_tiff_slide: Path):
    cases = [
        (_spec(4 * (5 * TILE) + 2, 4 * (4 * TILE), level=1, downsample=4.0), TILE),  # level-1 x = 1280.5
        (_spec(4 * TILE, 4 * TILE + 1, level=1, read=224, downsample=4.0), 224),  # level-1 y = 256.25
        (_spec(0, 0, read=4097), TILE),  # OpenSlide paints this in pieces
    ]
    with TileReader(small_tiff_slide) as reader, open_slide(small_tiff_slide) as slide:
        for spec, tile_px in cases:
            assert not reader.is_direct(spec), spec
            np.testing.assert_array_equal(reader.read(spec, tile_px), read_tile(slide, spec, tile_px))
        assert (reader.direct, reader.fallback, reader.decoded) == (0, len(cases), 0)


def test_a_level_with_a_fractional_downsample_goes_through_openslide(quarter_slide: Path):
    # 224 px at 4 µm/px: 3584 level-0 px per tile, read from level 2 (downsample 15.98) as 224 px.
    specs = _whole_grid(quarter_slide, tile_px=224, target_mpp=4.0)
    assert {spec.level for spec in specs} == {2}
    with TileReader(quarter_slide) as reader:
        assert 2 in reader.direct_levels
        # Only the level's origin maps onto a whole level pixel; OpenSlide resamples the rest.
        assert [reader.is_direct(spec) for spec in specs] == [spec.x == spec.y == 0 for spec in specs]
        pixels = reader.read_batch(specs, 224)
        assert (reader.direct, reader.fallback) == (1, len(specs) - 1)
    np.testing.assert_array_equal(pixels, _openslide_pixels(quarter_slide, specs, 224))


def test_edge_tiles_are_read_and_fractional_downsamples_go_through_openslide(odd_slide: Path):
    pixels = {}
    with TileReader(odd_slide) as reader:
        assert sorted(reader.direct_levels) == [0, 1]
        for level in (0, 1):
            specs = _level_tiles(odd_slide, level)
            pixels[level] = reader.read_batch(specs, TILE)
            np.testing.assert_array_equal(pixels[level], _openslide_pixels(odd_slide, specs, TILE))
        # Level 0: all 12 × 8 tiles, edge tiles included; level 1 (751 × 501 px, downsample 3.997):
        # only the tile at the origin maps onto whole level-1 pixels.
        assert reader.direct == 12 * 8 + 1
        assert reader.fallback == 3 * 2 - 1
    # Past the right edge of the slide (x = 3001) is white: OpenSlide's transparency, composited.
    assert (pixels[0][11][:, 3001 - 11 * TILE :] == 255).all()


def test_other_compressions_and_dicom_go_through_openslide(tmp_path: Path, small_dicom_slide: list[Path]):
    zlib_tiff = tmp_path / "zlib.tiff"
    tifffile.imwrite(zlib_tiff, _gradient(512, 768), tile=(TILE, TILE), photometric="rgb", compression="zlib")
    for path in (zlib_tiff, small_dicom_slide[0]):
        specs = [_spec(0, 0), _spec(TILE, TILE)]
        with TileReader(path) as reader:
            assert reader.direct_levels == {}
            pixels = reader.read_batch(specs, TILE)
            assert (reader.direct, reader.fallback) == (0, 2)
        np.testing.assert_array_equal(pixels, _openslide_pixels(path, specs, TILE))


def test_reading_directly_can_be_turned_off(small_tiff_slide: Path):
    with TileReader(small_tiff_slide, direct=False) as reader:
        assert reader.direct_levels == {}
        reader.read(_spec(0, 0), TILE)
        assert (reader.direct, reader.fallback) == (0, 1)


# --- through read_tiles, as the pipeline reads ------------------------------------------------------


def _collect(path: Path, specs: list[TileSpec], tile_px: int, workers: int) -> tuple[list[TileSpec], NDArray[np.uint8]]:
    batches = list(read_tiles(path, specs, tile_px=tile_px, batch_size=7, workers=workers))
    assert [len(batch) for batch, _ in batches] == [min(7, len(specs) - start) for start in range(0, len(specs), 7)]
    return [spec for batch, _ in batches for spec in batch], np.concatenate([pixels for _, pixels in batches])


def _read_tiles_cases(small_tiff_slide: Path) -> list[tuple[list[TileSpec], int]]:
    aligned = _level_tiles(small_tiff_slide, 0)[100:130]  # one TIFF tile each, decoded into the batch
    production = _whole_grid(small_tiff_slide, **HE_TISSUE)[30:60]  # assembled from the tiles they cover
    # Level-1 px (64 k + 0.5, 256): through OpenSlide.
    off = [_spec(4 * 64 * k + 2, 4 * TILE, level=1, read=224, downsample=4.0) for k in range(10)]
    return [(aligned, TILE), (production, 224), (off, 224)]


@pytest.mark.parametrize(
    ("workers", "pipes"), [(0, False), (2, False), (2, True)], ids=["in-process", "pool", "pool-over-pipes"]
)
def test_read_tiles_yields_openslides_pixels_in_order(
    small_tiff_slide: Path, workers: int, pipes: bool, monkeypatch: pytest.MonkeyPatch
):
    # The pool alone: this process must not read batches while the workers start.
    monkeypatch.setattr(tiles_module, "_READ_WHILE_STARTING", False)
    if pipes:  # as where /dev/shm has no room
        monkeypatch.setattr(tiles_module, "_create_slots", lambda slots, slot_bytes: None)
    for specs, tile_px in _read_tiles_cases(small_tiff_slide):
        order, pixels = _collect(small_tiff_slide, specs, tile_px, workers)
        assert order == specs
        np.testing.assert_array_equal(pixels, _openslide_pixels(small_tiff_slide, specs, tile_px))


def test_read_tiles_reads_in_this_process_until_the_workers_are_up(
    small_tiff_slide: Path, monkeypatch: pytest.MonkeyPatch
):
    read_here: list[int] = []

    class SlowReader(TileReader):
        """This process's reader, slowed down so the workers come up half way through."""

        def read_batch(
            self, specs: Sequence[TileSpec], tile_px: int, *, out: NDArray[np.uint8] | None = None
        ) -> NDArray[np.uint8]:
            read_here.append(len(specs))
            time.sleep(0.1)
            return super().read_batch(specs, tile_px, out=out)

    monkeypatch.setattr(tiles_module, "TileReader", SlowReader)
    specs = _level_tiles(small_tiff_slide, 0)[:80]
    batches = list(read_tiles(small_tiff_slide, specs, tile_px=TILE, batch_size=1, workers=2))
    assert 1 <= len(read_here) < len(specs)  # some batches here, the rest from the workers
    assert [spec for batch, _ in batches for spec in batch] == specs
    pixels = np.concatenate([pixels for _, pixels in batches])
    np.testing.assert_array_equal(pixels, _openslide_pixels(small_tiff_slide, specs, TILE))


def test_read_tiles_starts_no_workers_for_a_short_job(small_tiff_slide: Path, monkeypatch: pytest.MonkeyPatch):
    pools: list[object] = []

    def no_pool(*args: object, **kwargs: object) -> Iterator[object]:
        pools.append(args)
        return iter(())

    monkeypatch.setattr(tiles_module, "_read_with_pool", no_pool)
    specs = _level_tiles(small_tiff_slide, 0)[:5]  # a few milliseconds of reading
    batches = list(read_tiles(small_tiff_slide, specs, tile_px=TILE, batch_size=1, workers=2))
    assert pools == []
    assert [spec for batch, _ in batches for spec in batch] == specs


def test_read_tiles_releases_its_shared_memory(small_tiff_slide: Path, monkeypatch: pytest.MonkeyPatch):
    created: list[SharedMemory | None] = []

    def create(slots: int, slot_bytes: int) -> SharedMemory | None:
        block = original(slots, slot_bytes)
        created.append(block)
        return block

    original = tiles_module._create_slots
    monkeypatch.setattr(tiles_module, "_create_slots", create)
    monkeypatch.setattr(tiles_module, "_READ_WHILE_STARTING", False)  # straight to the pool
    specs = _level_tiles(small_tiff_slide, 0)[:40]
    reader = read_tiles(small_tiff_slide, specs, tile_px=TILE, batch_size=4, workers=2)
    next(reader)
    reader.close()  # abandoned after one batch
    broken = [*specs[:8], dataclasses.replace(specs[8], read_width=-1)]
    with pytest.raises(UnreadableSlideError):
        list(read_tiles(small_tiff_slide, broken, tile_px=TILE, batch_size=4, workers=2))
    assert len(created) == 2
    for block in created:
        assert block is not None
        with pytest.raises(FileNotFoundError):
            SharedMemory(name=block.name)
