"""Tissue detection converts the whole slide at low resolution to HSV; its memory must stay a few bytes
per mask pixel (the mask of a 100 000 × 80 000 px slide has 7.8 million)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from skimage.color import rgb2hsv

from batch_job import slide as slide_module


def test_saturation_strip_by_strip_is_scikit_images(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slide_module, "_HSV_STRIP_PIXELS", 1000)  # 14 strips of 7 rows
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(97, 131, 3), dtype=np.uint8)
    rgb[:5] = 0  # black: saturation 0, not NaN
    rgb[5:9] = 128  # grey
    saturation, bright = slide_module._saturation_and_brightness(rgb, min_value=0.15)
    hsv = rgb2hsv(rgb)
    np.testing.assert_array_equal(saturation, hsv[..., 1])
    np.testing.assert_array_equal(bright, hsv[..., 2] > 0.15)


def test_saturation_takes_a_few_bytes_per_pixel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slide_module, "_HSV_STRIP_PIXELS", 64 * 1024)
    rgb = np.random.default_rng(1).integers(0, 256, size=(1000, 1000, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        slide_module._saturation_and_brightness(rgb, min_value=0.15)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The saturation (8 B/px) and the brightness mask (1) plus one strip's conversion; HSV of the
    # whole image at once held ~100 B/px (0.8 GB for the tissue mask of a 100 000 × 80 000 px slide).
    assert peak / rgb[..., 0].size < 20, f"{peak / rgb[..., 0].size:.0f} bytes per pixel"
