"""Shared fixtures: small generated slides (made once per test session).

The TIFF slide is 8192 × 6144 px at 0.5 µm/px (4.1 × 3.1 mm, about 100 classifier tiles on tissue);
``small_tiff_truth`` is the procedural model it was painted from, for ground-truth checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from local.synthetic import SyntheticTissue, write_synthetic_dicom, write_synthetic_dicom_zip, write_synthetic_slide
from slidebridge.analysis import SlideAnalysis


@dataclass(frozen=True)
class SlideParams:
    width: int  # level-0 px
    height: int
    mpp: float  # µm/px
    seed: int

    def model(self) -> SyntheticTissue:
        return SyntheticTissue(self.width, self.height, seed=self.seed, mpp=self.mpp)


SMALL_TIFF = SlideParams(width=8192, height=6144, mpp=0.5, seed=3)
SMALL_DICOM = SlideParams(width=2048, height=1536, mpp=0.5, seed=5)


@pytest.fixture(scope="session")
def small_tiff_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Aperio-style pyramidal JPEG TIFF (levels 8192 × 6144, 2048 × 1536 and 512 × 384 px)."""
    path = tmp_path_factory.mktemp("tiff-slide") / "slide.svs"
    p = SMALL_TIFF
    return write_synthetic_slide(path, p.width, p.height, seed=p.seed, mpp=p.mpp)


@pytest.fixture(scope="session")
def small_tiff_truth() -> SyntheticTissue:
    """What ``small_tiff_slide`` shows: ``tissue_truth``/``cellular_truth`` at any downsample."""
    return SMALL_TIFF.model()


@pytest.fixture(scope="session")
def small_tiff_analysis(small_tiff_slide: Path) -> SlideAnalysis:
    """The default classifier's analysis of ``small_tiff_slide`` (tiles read in this process)."""
    from batch_job.analyze import analyze_slide  # noqa: PLC0415 - torch, only for the tests that need it
    from batch_job.classifiers import get_classifier  # noqa: PLC0415

    return analyze_slide(small_tiff_slide, get_classifier("he-tissue", "1.0.0"), tile_workers=0, batch_size=16)


@pytest.fixture(scope="session")
def small_dicom_slide(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A DICOM WSI series, one file per level (2048 × 1536 and 512 × 384 px), as separate downloads."""
    folder = tmp_path_factory.mktemp("dicom-slide")
    p = SMALL_DICOM
    return write_synthetic_dicom(folder, p.width, p.height, seed=p.seed, mpp=p.mpp)


@pytest.fixture(scope="session")
def small_dicom_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same DICOM series, zipped (members under ``series/``)."""
    path = tmp_path_factory.mktemp("dicom-zip") / "series.zip"
    p = SMALL_DICOM
    return write_synthetic_dicom_zip(path, p.width, p.height, seed=p.seed, mpp=p.mpp)
