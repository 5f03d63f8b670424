"""batch_job.slide: format sniffing, preparing and opening slides, tissue detection, the tile grid."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import numpy as np
import openslide
import pydicom
import pytest
import tifffile
from PIL import Image

from batch_job.slide import (
    SlideFormat,
    detect_tissue,
    open_slide,
    prepare_slide,
    read_downsampled,
    slide_mpp,
    sniff_format,
    tile_geometry,
    tile_grid,
)
from local.synthetic import SyntheticTissue
from slidebridge.errors import UnreadableSlideError, UnsupportedFormatError, UserInputError

# --- sniffing ----------------------------------------------------------------------------------------


def test_sniffs_the_generated_slides(small_tiff_slide: Path, small_dicom_slide: list[Path], small_dicom_zip: Path):
    assert sniff_format(small_tiff_slide) is SlideFormat.TIFF
    assert sniff_format(small_dicom_slide[0]) is SlideFormat.DICOM
    assert sniff_format(small_dicom_zip) is SlideFormat.DICOM_ZIP


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("bigtiff", [False, True])
def test_sniffs_tiff_and_bigtiff_in_both_byte_orders(tmp_path: Path, byteorder: str, bigtiff: bool):
    path = tmp_path / "image.bin"  # no extension to lean on, as with a presigned URL
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), byteorder=byteorder, bigtiff=bigtiff)
    assert sniff_format(path) is SlideFormat.TIFF


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "white").save(buffer, format="JPEG")
    return buffer.getvalue()


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (_png_bytes(), "unsupported format: PNG image (magic 89504e47)"),
        (_jpeg_bytes(), "unsupported format: JPEG image (magic ffd8ffe0)"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "unsupported format: PDF document (magic 25504446)"),
        (gzip.compress(b"slide"), "unsupported format: gzip archive (magic 1f8b0800)"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "unsupported format: HTML document"),
        (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code></Error>',
            "unsupported format: XML document",
        ),
        (b"", "unsupported format: empty file"),
        (b"\x00\x01\x02\x03 just bytes", "unsupported format: unrecognised data (magic 00010203)"),
        (_zip_bytes({"readme.txt": b"hello"}), "unsupported format: ZIP archive without DICOM files (readme.txt)"),
    ],
    ids=["png", "jpeg", "pdf", "gzip", "html", "xml", "empty", "unknown", "zip-without-dicom"],
)
def test_refuses_other_formats_naming_what_was_found(tmp_path: Path, content: bytes, expected: str):
    path = tmp_path / "download"
    path.write_bytes(content)
    with pytest.raises(UnsupportedFormatError) as caught:
        sniff_format(path)
    assert str(caught.value) == expected
    assert caught.value.code == "UNSUPPORTED_FORMAT"


# --- opening ---------------------------------------------------------------------------------------


def test_openslide_reads_the_generated_tiff_as_aperio(small_tiff_slide: Path, small_tiff_truth: SyntheticTissue):
    with open_slide(small_tiff_slide) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert slide_mpp(slide) == (0.5, 0.5)
        assert slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER] == "20"
        # ×4 steps until the smaller side drops below 1024 px
        assert slide.level_dimensions == ((8192, 6144), (2048, 1536), (512, 384))
        assert slide.level_downsamples == (1.0, 4.0, 16.0)
        # The pixels are what the model painted: glass where there is no tissue, stain where there is.
        thumb = read_downsampled(slide, 64.0)
    truth = small_tiff_truth.tissue_truth(64.0)
    assert thumb.shape == (*truth.shape, 3)
    brightness = thumb.astype(float).mean(axis=2)
    assert brightness[~truth].mean() > 235
    assert brightness[truth].mean() < 215


def test_downsampled_read_is_the_same_on_any_number_of_cores(
    small_tiff_slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Strips are read by several threads; the picture (and so the tissue mask) must not depend on how
    many cores the instance has."""
    import batch_job.slide as slide_module  # noqa: PLC0415

    monkeypatch.setattr(slide_module, "_STRIP_PIXELS", 40_000)  # many strips of a few rows each
    pictures = []
    with open_slide(small_tiff_slide) as slide:
        for threads in (1, 3, 4):
            monkeypatch.setattr(slide_module, "_strip_threads", lambda threads=threads: threads)
            pictures.append(read_downsampled(slide, 6.0))
        whole = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("RGB"))
    assert pictures[0].shape == (1024, 1366, 3)
    for picture in pictures[1:]:
        np.testing.assert_array_equal(picture, pictures[0])
    # And it is the slide: the level-1 picture shrunk to the same size, give or take resampling.
    expected = np.asarray(Image.fromarray(whole).resize((1366, 1024), Image.Resampling.BOX))
    assert np.abs(pictures[0].astype(int) - expected.astype(int)).mean() < 3


def test_dicom_files_open_as_one_slide(small_dicom_slide: list[Path], tmp_path: Path):
    path = prepare_slide(small_dicom_slide, tmp_path)
    with open_slide(path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "dicom"
        assert slide.level_dimensions == ((2048, 1536), (512, 384))
        assert slide_mpp(slide) == pytest.approx((0.5, 0.5))
        region = np.asarray(slide.read_region((0, 0), 1, (512, 384)).convert("RGB"))
    # Level 1 of the DICOM series shows the same picture as the model renders at downsample 4.
    expected = SyntheticTissue(2048, 1536, seed=5, mpp=0.5).render(0, 0, 512, 384, 4.0)
    assert np.abs(region.astype(int) - expected.astype(int)).mean() < 4


def test_zipped_dicom_series_is_extracted_and_opened(small_dicom_zip: Path, tmp_path: Path):
    path = prepare_slide([small_dicom_zip], tmp_path / "work")
    assert path.is_relative_to(tmp_path / "work")
    with open_slide(path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "dicom"
        assert slide.level_count == 2


def test_zip_member_names_cannot_escape_the_workdir(small_dicom_slide: list[Path], tmp_path: Path):
    evil = tmp_path / "evil.zip"
    members = {
        "../../escaped.dcm": small_dicom_slide[0].read_bytes(),
        "/abs/level1.dcm": small_dicom_slide[1].read_bytes(),
    }
    evil.write_bytes(_zip_bytes(members))
    work = tmp_path / "deep" / "work"
    path = prepare_slide([evil], work)
    assert not (tmp_path / "escaped.dcm").exists()
    assert not Path("/abs/level1.dcm").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["00000.dcm", "00001.dcm"]
    with open_slide(path) as slide:
        assert slide.level_count == 2


def test_zip_that_unpacks_too_large_is_refused(small_dicom_zip: Path, tmp_path: Path):
    with pytest.raises(UserInputError) as caught:
        prepare_slide([small_dicom_zip], tmp_path, max_archive_bytes=10_000)
    assert caught.value.code == "ARCHIVE_TOO_LARGE"


def test_several_tiffs_or_mixed_formats_are_refused(
    small_tiff_slide: Path, small_dicom_slide: list[Path], tmp_path: Path
):
    with pytest.raises(UnsupportedFormatError, match="single file"):
        prepare_slide([small_tiff_slide, small_tiff_slide], tmp_path)
    with pytest.raises(UnsupportedFormatError, match="single file"):
        prepare_slide([small_tiff_slide, small_dicom_slide[0]], tmp_path)


def test_a_damaged_tiff_is_unreadable(small_tiff_slide: Path, tmp_path: Path):
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(small_tiff_slide.read_bytes()[:2000])
    assert sniff_format(truncated) is SlideFormat.TIFF  # it still looks like a TIFF ...
    with pytest.raises(UnreadableSlideError) as caught:  # ... but OpenSlide cannot use it
        open_slide(truncated)
    assert caught.value.code == "UNREADABLE_SLIDE"


def test_a_tiff_without_resolution_is_a_user_error(tmp_path: Path):
    path = tmp_path / "no-mpp.tiff"
    tifffile.imwrite(path, np.full((512, 512, 3), 240, np.uint8), tile=(256, 256), photometric="rgb")
    with open_slide(path) as slide, pytest.raises(UserInputError) as caught:
        slide_mpp(slide)
    assert caught.value.code == "MISSING_RESOLUTION"


# --- tissue ----------------------------------------------------------------------------------------


def test_tissue_mask_covers_the_painted_tissue(small_tiff_slide: Path, small_tiff_truth: SyntheticTissue):
    with open_slide(small_tiff_slide) as slide:
        tissue = detect_tissue(slide)
    assert tissue.downsample_x == pytest.approx(16.0)  # 8 µm/px on a 0.5 µm/px slide
    truth = small_tiff_truth.tissue_truth(tissue.downsample_x)
    assert tissue.mask.shape == truth.shape
    iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
    assert iou > 0.9
    true_area_mm2 = truth.sum() * (16 * 0.5 / 1000) ** 2
    assert tissue.area_mm2 == pytest.approx(true_area_mm2, rel=0.1)


def test_a_blank_slide_has_no_tissue(tmp_path: Path):
    path = tmp_path / "blank.svs"
    tifffile.imwrite(
        path,
        np.full((1024, 1024, 3), 244, np.uint8),
        tile=(256, 256),
        photometric="rgb",
        description="Aperio Image Library v12.0.15 \r\n1024x1024|AppMag = 20|MPP = 0.5",
        metadata=None,
    )
    with open_slide(path) as slide:
        assert not detect_tissue(slide).mask.any()


# --- tile grid --------------------------------------------------------------------------------------


def test_tile_grid_at_classifier_resolution_reads_level_0_when_no_level_fits(
    small_tiff_slide: Path, small_tiff_truth: SyntheticTissue
):
    with open_slide(small_tiff_slide) as slide:
        mask = detect_tissue(slide)
        specs = tile_grid(slide, mask, tile_px=224, target_mpp=1.0, min_tissue_fraction=0.5)
    # 224 px at 1 µm/px = 448 level-0 px at 0.5 µm/px; level 1 (×4) would be too coarse.
    assert {(s.width, s.height, s.level, s.read_width, s.read_height) for s in specs} == {(448, 448, 0, 448, 448)}
    assert all((s.x, s.y) == (s.col * 448, s.row * 448) for s in specs)
    assert len({(s.col, s.row) for s in specs}) == len(specs)
    # Each tile chosen has at least half its area on painted tissue (within mask resolution).
    truth = small_tiff_truth.tissue_truth(16.0)
    for spec in specs:
        assert spec.tissue_fraction >= 0.5
        window = truth[spec.y // 16 : (spec.y + 448) // 16, spec.x // 16 : (spec.x + 448) // 16]
        assert window.mean() > 0.35


def _aperio_pyramid(path: Path, side: int, levels: int, mpp: float) -> Path:
    """A plain grey Aperio-style TIFF with levels ×1, ×4, ×16, ... (content irrelevant, fast to write).

    Level sides are ``side // 4**level``, as scanners round them: with ``side`` not a multiple of 4 the
    levels' downsamples come out a little above 4, 16, ...
    """
    tile = np.full((256, 256, 3), 200, np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for level in range(levels):
            size = side // 4**level
            tif.write(
                (tile for _ in range(max(1, -(-size // 256)) ** 2)),
                shape=(size, size, 3),
                dtype=np.uint8,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                description=f"Aperio Image Library v12.0.15 \r\n{side}x{side}|AppMag = 40|MPP = {mpp}",
                metadata=None,
            )
    return path


@pytest.mark.parametrize(
    ("slide_mpp_um", "tile_px", "target_mpp", "expected"),
    [
        # (level-0 tile side, level read, read side): the coarsest level at least as fine as needed
        (0.25, 224, 0.25, (224, 0, 224)),  # classifier at scan resolution: level 0 as is
        (0.25, 224, 0.5, (448, 0, 448)),  # needs ×2: level 0, shrink 448 → 224
        (0.25, 224, 1.0, (896, 1, 224)),  # needs ×4: exactly level 1
        (0.25, 224, 4.0, (3584, 2, 224)),  # needs ×16: exactly level 2
        (0.25, 256, 8.0, (8192, 2, 512)),  # needs ×32: level 2, shrink 512 → 256
        (2.0, 224, 1.0, (112, 0, 112)),  # a coarse scan: level 0, enlarge 112 → 224
    ],
)
def test_tile_geometry_picks_the_level_for_the_downsample(
    tmp_path: Path, slide_mpp_um: float, tile_px: int, target_mpp: float, expected: tuple[int, int, int]
):
    path = _aperio_pyramid(tmp_path / "pyramid.svs", 4096, 3, slide_mpp_um)
    with open_slide(path) as slide:
        assert slide.level_downsamples == (1.0, 4.0, 16.0)
        geometry = tile_geometry(slide, tile_px=tile_px, target_mpp=target_mpp)
    assert (geometry.tile_width, geometry.level, geometry.read_width) == expected
    assert (geometry.tile_height, geometry.read_height) == (expected[0], expected[2])


def test_levels_a_hair_coarser_than_a_power_of_4_are_still_used(tmp_path: Path):
    # 4099 px: level 1 is 1024 px, a downsample of 4.003 rather than 4. Reading level 0 instead would
    # decode 16 times the pixels for every tile.
    path = _aperio_pyramid(tmp_path / "odd.svs", 4099, 3, 0.25)
    with open_slide(path) as slide:
        assert slide.level_downsamples[1] == pytest.approx(4.0029, abs=1e-4)
        geometry = tile_geometry(slide, tile_px=224, target_mpp=1.0)
        assert (geometry.tile_width, geometry.level, geometry.read_width) == (896, 1, 224)
        # A level clearly too coarse is still passed over: ×12 needed, level 2 is ×16.
        assert tile_geometry(slide, tile_px=224, target_mpp=3.0).level == 1


def _secondary_capture(path: Path) -> Path:
    """A DICOM file that is not a slide (an export's screenshot or report often comes first)."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dataset = pydicom.dataset.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_a_dicom_export_whose_first_file_is_not_the_slide_still_opens(small_dicom_slide: list[Path], tmp_path: Path):
    capture = _secondary_capture(tmp_path / "capture.dcm")
    path = prepare_slide([capture, *small_dicom_slide], tmp_path / "work")
    assert path.name != "00000.dcm"  # the capture took that name
    with open_slide(path) as slide:
        assert slide.level_dimensions == ((2048, 1536), (512, 384))


def test_dicom_files_without_a_slide_are_refused_saying_what_they_are(tmp_path: Path):
    capture = _secondary_capture(tmp_path / "capture.dcm")
    with pytest.raises(UnsupportedFormatError, match=r"none is a whole-slide microscopy image.*Secondary Capture"):
        prepare_slide([capture], tmp_path / "work")
