"""What the demo's pictures share: the slide thumbnail they are drawn on, and the panel's typeface.

Kept apart from ``local.demo_sectra`` (which imports the Sectra mock and its FastAPI) so that every
flow can draw without the others' dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFont

from local.demo import DemoError

# The thumbnail results are drawn on: at most this many px on its longer side.
THUMBNAIL_MAX_PX = 2048

# Pillow's built-in font has no "²", "µ" or "·", which the panels use (mm², µm/px); DejaVu Sans (most
# Linux systems) has them. Without it the built-in font is used, with these stand-ins.
_PREFERRED_FONT = "DejaVuSans.ttf"
_ASCII_STAND_INS = str.maketrans({"²": "2", "µ": "u", "·": "-"})


@dataclass(frozen=True)
class Typeface:
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont
    complete: bool  # False: the built-in font, which lacks some glyphs

    def fit(self, text: str) -> str:
        return text if self.complete else text.translate(_ASCII_STAND_INS)


def typeface(size: int) -> Typeface:
    try:
        return Typeface(ImageFont.truetype(_PREFERRED_FONT, size), complete=True)
    except OSError:
        return Typeface(ImageFont.load_default(size=size), complete=False)


def slide_thumbnail(path: Path) -> Image.Image:
    """The slide at most ``THUMBNAIL_MAX_PX`` on its longer side, as RGB."""
    import openslide  # noqa: PLC0415 - the native library loads only when a picture is drawn

    try:
        with openslide.OpenSlide(str(path)) as handle:
            # OpenSlide reads a pyramid level near this size: the slide is never held whole in memory.
            thumbnail: Image.Image = handle.get_thumbnail((THUMBNAIL_MAX_PX, THUMBNAIL_MAX_PX))
    except openslide.OpenSlideError as exc:
        raise DemoError(f"could not read the thumbnail of {path}: {exc}") from exc
    return thumbnail.convert("RGB")
