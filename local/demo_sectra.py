"""The demo's Sectra flow: a mock Sectra PACS invokes the local stack and shows the result.

What a pathologist would see, step by step: the in-process ``MockSectraServer`` (the real one from
``sectra-image-analysis-api``, as in ``tests/e2e/test_sectra_flow.py``) serves the demo slide and its
metadata; we read the registration form from ``GET {stack}/hooks/sectra/{key}``, fire a ``create``
(wholeSlide) invocation at it, print the webhook's answer, then follow the annotation as the job
updates it in place ("Analysis queued" → "Analysing… 25 %" → … → the headline). Finally the result's
primitives are drawn on the slide thumbnail (``sectra-result.png``) and the result is kept as JSON.

Imported lazily by ``local.demo.SectraFlow``: ``sectra_client`` is a dev dependency that brings
FastAPI and uvicorn, which nothing else in ``local.demo`` needs.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageColor, ImageDraw
from sectra_client.mock_server import MockSectraServer
from sectra_client.schemas import CallbackInfo, CreateInvocation, Size, WholeSlideInput
from sectra_client.schemas.common import DisplayedName
from sectra_client.schemas.image import FocalPlane, ImageMetadata, OpticalPath, SlideFormat, TileFormat

from local.demo import DemoContext, DemoError, FlowResult, SlideFile
from local.pictures import slide_thumbnail, typeface

__all__ = [
    "SectraTimeline",
    "check_result",
    "level0_from_sectra",
    "render_result",
    "run_sectra_flow",
    "slide_metadata",
]

# Texts of the interim results our job writes (slidebridge.vendors.sectra: placeholder, progress).
_INTERIM_PREFIXES = ("Analysis queued", "Analysing")
# Terminal texts that mean the analysis did not produce a result (message_result's callers).
_FAILED_PREFIXES = ("Analysis failed", "Analysis cancelled")
# get_results is read in-process, so polling often costs nothing and catches every progress step.
_POLL_S = 0.2


@dataclass
class SectraTimeline:
    """What the viewer showed, and when (seconds since the ``create`` was sent)."""

    changes: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)

    def record(self, elapsed_s: float, display_result: str, properties: dict[str, Any]) -> bool:
        """Remember a new viewer state; ``False`` when the text shown did not change."""
        if self.changes and self.changes[-1][1] == display_result:
            return False
        self.changes.append((elapsed_s, display_result, properties))
        return True


def level0_from_sectra(x: float, y: float, width_px: int) -> tuple[float, float]:
    """Sectra coordinates → level-0 px: Sectra divides BOTH x and y by the image width (SECTRA.md §9)."""
    return x * width_px, y * width_px


def slide_metadata(slide_id: str, slide: SlideFile) -> Any:
    """The mock's ``/slides/{id}/info`` for the demo slide: its real level-0 size and µm/px."""
    return ImageMetadata(
        id=slide_id,
        isStreamable=True,
        imageSize=Size(width=slide.width_px, height=slide.height_px),
        tileSize=Size(width=256, height=256),
        micronsPerPixel=slide.mpp,
        focalPlanes=[FocalPlane(id="0", offsetUm=0.0)],
        opticalPaths=[OpticalPath(id="0", description="Brightfield")],
        storedTileFormat=TileFormat(mimeType="image/jpeg", extension="jpg"),
        availableTileFormats=[TileFormat(mimeType="image/jpeg", extension="jpg")],
        fileFormat=SlideFormat(mimeType=slide.media_type),
        staining=DisplayedName(displayName="HE"),
        block=DisplayedName(displayName="A1"),
    )


def _results(mock: MockSectraServer, app_id: str, slide_id: str) -> list[dict[str, Any]]:
    # The mock's server thread may insert a result while we iterate its dict; just read again.
    for _ in range(10):
        try:
            return [r.model_dump(mode="json") for r in mock.get_results(app_id, slide_id)]
        except RuntimeError:
            time.sleep(0.01)
    return [r.model_dump(mode="json") for r in mock.get_results(app_id, slide_id)]


def _format_properties(properties: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in properties.items())


def _registration(http: httpx.Client, hook: str) -> dict[str, Any]:
    """What Sectra's "Retrieve registration info" reads: the application id to invoke, among others."""
    response = http.get(hook)
    if response.status_code != 200:
        raise DemoError(f"GET on the Sectra webhook answered {response.status_code}: {response.text[:500]}")
    registration: dict[str, Any] = response.json()
    return registration


def _wait_for_final(
    mock: MockSectraServer,
    app_id: str,
    slide_id: str,
    *,
    sent_at: float,
    timeout_s: float,
    timeline: SectraTimeline,
    log_path: Path,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll the mock until the annotation is no longer interim; prints each change the viewer shows."""
    while True:
        results = _results(mock, app_id, slide_id)
        elapsed = time.monotonic() - sent_at
        if results:
            latest = results[-1]
            text = str(latest.get("displayResult", ""))
            properties = dict(latest.get("displayProperties") or {})
            if timeline.record(elapsed, text, properties):
                print(f"  [sectra] {elapsed:6.1f} s  {text}  ({_format_properties(properties)})", flush=True)
            if not text.startswith(_INTERIM_PREFIXES):
                return latest, results
        if elapsed > timeout_s:
            shown = repr(timeline.changes[-1][1]) if timeline.changes else "no result at all"
            raise DemoError(
                f"no final Sectra result for slide {slide_id} after {timeout_s:.0f} s; "
                f"the viewer still shows {shown} (the stack's log is {log_path})"
            )
        time.sleep(_POLL_S)


# --- checking and drawing the result --------------------------------------------------------------


def _items(result: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The result type and its primitive items (a patch gallery's polygons as one unstyled item)."""
    content_value = (result.get("data") or {}).get("result") or {}
    kind = str(content_value.get("type", ""))
    content = content_value.get("content")
    if kind == "patchCollection" and isinstance(content, dict):
        return kind, [{"polygons": content.get("polygons") or [], "labels": []}]
    items = content if isinstance(content, list) else [content] if isinstance(content, dict) else []
    return kind, [i for i in items if isinstance(i, dict)]


def _points(shape: dict[str, Any]) -> list[tuple[float, float]]:
    return [(float(p["x"]), float(p["y"])) for p in shape.get("points") or []]


def check_result(result: dict[str, Any], slide: SlideFile) -> tuple[list[str], int]:
    """Problems a pathologist would notice, and the number of class polygons."""
    problems: list[str] = []
    _, items = _items(result)
    polygons = [_points(poly) for item in items for poly in item.get("polygons") or []]
    if not polygons and str(result.get("displayResult")) != "No tissue detected":
        problems.append("the final result has no polygons")
    # Both coordinates are divided by the width: x ∈ [0, 1], y ∈ [0, H/W] (SECTRA.md §9).
    y_max = slide.height_px / slide.width_px
    outside = [(x, y) for poly in polygons for x, y in poly if not (0 <= x <= 1 and 0 <= y <= y_max + 1e-9)]
    if outside:
        problems.append(f"{len(outside)} polygon points lie outside the slide, e.g. {outside[0]}")
    return problems, len(polygons)


def _color(value: Any, default: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    if not isinstance(value, str) or not value:
        return default
    try:
        rgba = ImageColor.getrgb(value)
    except ValueError:
        return default
    return (rgba[0], rgba[1], rgba[2], rgba[3] if len(rgba) == 4 else 255)


def _properties_panel(width: int, display_result: str, properties: dict[str, Any], font_px: int) -> Image.Image:
    """The annotation list line and its property popup, as a strip under the slide."""
    title_font, font = typeface(round(font_px * 1.2)), typeface(font_px)
    rows = [f"{k}: {v}" for k, v in properties.items()]
    columns = 2
    per_column = (len(rows) + columns - 1) // columns
    line_px = round(font_px * 1.5)
    margin = font_px
    height = margin * 2 + round(line_px * 1.4) + per_column * line_px
    panel = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(panel)
    draw.text((margin, margin), title_font.fit(display_result), fill="black", font=title_font.font)
    top = margin + round(line_px * 1.4)
    column_px = (width - 2 * margin) // columns
    for index, row in enumerate(rows):
        column, line = divmod(index, per_column)
        draw.text((margin + column * column_px, top + line * line_px), font.fit(row), fill=(60, 60, 60), font=font.font)
    return panel


def render_result(
    result: dict[str, Any],
    thumbnail: Image.Image,
    slide_width_px: int,
    slide_height_px: int,
) -> Image.Image:
    """The thumbnail with the result's primitives on it, and its text and properties underneath.

    Points are Sectra coordinates (x/W, y/W); they become level-0 px (× W) and then thumbnail px
    (× thumbnail size / level-0 size, per axis). Fill and stroke colours are the result's own.
    """
    base = thumbnail.convert("RGBA")
    sx, sy = base.width / slide_width_px, base.height / slide_height_px

    def to_thumb(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        level0 = [level0_from_sectra(x, y, slide_width_px) for x, y in points]
        return [(px * sx, py * sy) for px, py in level0]

    fills = Image.new("RGBA", base.size, (0, 0, 0, 0))
    fill_draw = ImageDraw.Draw(fills)
    lines = Image.new("RGBA", base.size, (0, 0, 0, 0))
    line_draw = ImageDraw.Draw(lines)
    line_px = max(2, round(base.width / 700))
    font_px = max(14, round(base.width / 64))
    font = typeface(font_px)
    labels: list[tuple[tuple[float, float], str, tuple[int, int, int, int]]] = []
    _, items = _items(result)
    for item in items:
        style = item.get("style") or {}
        stroke = _color(style.get("strokeStyle"), (255, 255, 0, 255))
        fill = _color(style.get("fillStyle"), (0, 0, 0, 0))
        for polygon in item.get("polygons") or []:
            points = to_thumb(_points(polygon))
            if len(points) < 3:
                continue
            fill_draw.polygon(points, fill=fill)
            line_draw.line([*points, points[0]], fill=stroke, width=line_px, joint="curve")
        for polyline in item.get("polylines") or []:
            points = to_thumb(_points(polyline))
            if len(points) >= 2:
                line_draw.line(points, fill=stroke, width=line_px, joint="curve")
        for label in item.get("labels") or []:
            location = label.get("location") or {}
            (anchor,) = to_thumb([(float(location.get("x", 0)), float(location.get("y", 0)))])
            # An unstyled label (the headline) in white, a class label in its class colour.
            labels.append((anchor, str(label.get("label", "")), stroke if item.get("style") else (255, 255, 255, 255)))
    picture = Image.alpha_composite(Image.alpha_composite(base, fills), lines)
    draw = ImageDraw.Draw(picture)
    pad = max(2, font_px // 4)
    for (anchor_x, anchor_y), label_text, color in labels:
        # ``location`` is the label's upper-left corner (SECTRA.md §8); keep the box on the picture.
        text = font.fit(label_text)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font.font)
        x = min(max(0.0, anchor_x), picture.width - (right - left) - 2 * pad)
        y = min(max(0.0, anchor_y), picture.height - (bottom - top) - 2 * pad)
        draw.rectangle((x, y, x + right - left + 2 * pad, y + bottom - top + 2 * pad), fill=(0, 0, 0, 170))
        draw.text((x + pad - left, y + pad - top), text, fill=color, font=font.font)
    panel = _properties_panel(
        picture.width,
        str(result.get("displayResult", "")),
        dict(result.get("displayProperties") or {}),
        max(12, round(font_px * 0.8)),
    )
    out = Image.new("RGB", (picture.width, picture.height + panel.height), "white")
    out.paste(picture.convert("RGB"), (0, 0))
    out.paste(panel, (0, picture.height))
    return out


# --- the flow -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MockSession:
    mock: MockSectraServer
    token: str
    slide_id: str


@contextlib.contextmanager
def _mock_sectra(slide: SlideFile) -> Iterator[_MockSession]:
    """The real mock Sectra server on a free loopback port, serving ``slide`` with its real metadata."""
    token = secrets.token_urlsafe(24)
    mock = MockSectraServer(token=token)
    slide_id = f"demo-{uuid.uuid4().hex[:8]}"
    mock.add_slide(slide_metadata(slide_id, slide))
    mock.add_slide_files(slide_id, slide.path)
    try:
        mock.run(port=0, host="127.0.0.1")
    except (RuntimeError, OSError) as exc:
        raise DemoError(f"the mock Sectra server did not start: {exc}") from exc
    try:
        yield _MockSession(mock, token, slide_id)
    finally:
        mock.stop()


def run_sectra_flow(ctx: DemoContext, name: str = "sectra") -> FlowResult:
    """Invoke the stack as Sectra would, follow the annotation, draw the final result."""
    start = time.monotonic()
    if not ctx.sectra_webhook_key:
        raise DemoError("no Sectra webhook key (SLIDEBRIDGE_SECTRA_WEBHOOK_KEY) for the local stack")
    hook = f"{ctx.stack.url}/hooks/sectra/{ctx.sectra_webhook_key}"
    slide = ctx.slide
    # trust_env=False: loopback only, never through a proxy from the environment.
    with httpx.Client(timeout=30.0, trust_env=False) as http:
        registration = _registration(http, hook)
        app_id = str(registration["applicationId"])
        print(
            f"  [sectra] registration: application {app_id} "
            f"({registration.get('displayName')}, input {(registration.get('inputTemplate') or {}).get('type')})",
            flush=True,
        )
        with _mock_sectra(slide) as session:
            mock = session.mock
            print(f"  [sectra] mock Sectra at {mock.url}, slide {session.slide_id}", flush=True)
            invocation = CreateInvocation(
                applicationId=app_id,
                slideId=session.slide_id,
                cancellationToken=uuid.uuid4().hex,
                callbackInfo=CallbackInfo(url=mock.url, token=session.token),
                input=WholeSlideInput(),
            )
            sent_at = time.monotonic()
            answer = http.post(hook, json=invocation.model_dump(mode="json"))
            if answer.status_code != 200:
                raise DemoError(f"the Sectra webhook answered {answer.status_code}: {answer.text[:1000]}")
            stored = answer.json()
            if not isinstance(stored, dict):
                raise DemoError(f"the Sectra webhook answered a create with {stored!r}, not the stored result")
            print(
                f"  [sectra] webhook answered in {time.monotonic() - sent_at:.1f} s: result {stored.get('id')}, "
                f"versionId {stored.get('versionId')}, {stored.get('displayResult')!r}",
                flush=True,
            )
            timeline = SectraTimeline()
            final, results = _wait_for_final(
                mock,
                app_id,
                session.slide_id,
                sent_at=sent_at,
                timeout_s=ctx.timeout_s,
                timeline=timeline,
                log_path=ctx.stack.log_path,
            )
            result_after_s = time.monotonic() - sent_at
    text = str(final.get("displayResult", ""))
    result = FlowResult(
        name,
        ok=False,
        run_wall_time_s=result_after_s,
        headline=text,
        display_properties=dict(final.get("displayProperties") or {}),
    )
    dest = ctx.output_dir / name
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "result.json").write_text(json.dumps(final, indent=2, ensure_ascii=False))
    problems: list[str] = []
    if text.startswith(_FAILED_PREFIXES):
        problems.append(f"the viewer shows {text!r}")
    if final.get("id") != stored.get("id"):
        problems.append(f"the final result is {final.get('id')}, not the placeholder {stored.get('id')} updated")
    if len(results) != 1:
        problems.append(f"{len(results)} results on the slide, expected one updated in place")
    shape_problems, polygon_count = check_result(final, slide)
    problems += shape_problems
    picture_path = ctx.output_dir / f"{name}-result.png"
    render_result(final, slide_thumbnail(slide.path), slide.width_px, slide.height_px).save(picture_path)
    result.images.append(picture_path)
    result.ok = not problems
    result.message = "; ".join(problems) or (
        f"result {final.get('id')} on slide {final.get('slideId')}: {polygon_count} class polygons, "
        f"{len(timeline.changes)} viewer updates"
    )
    result.elapsed_s = time.monotonic() - start
    return result
