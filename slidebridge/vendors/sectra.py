"""Sectra DPAT Image Analysis API (IA-API): wire models, result builders and our own httpx client.

Facts and their sources are in ``vendors/SECTRA.md`` (the "fact sheet"; § numbers below refer to it).
We do not use ``sectra_client`` (amspath) in production code: it has no timeouts, retries that never
fire, strict models that reject real payloads, and a download that holds the slide in memory (§14).

Three groups:

- **Inbound** models (what Sectra sends us: invocations, image notifications, slide info, stored
  results) are LENIENT: unknown keys are kept, almost everything is nullable, ``context: null`` is
  ``{}``. They reject only what we cannot act on (no action, slide id, application id or callback
  URL; an unknown action; a ``taggedPolygon`` without a polygon of ≥ 3 points; a ``multiArea``
  without polygons), so the webhook can answer a clear 4xx instead of failing later. Their errors
  never quote input values (the callback token): answer with :func:`describe_validation_error`.
- **Outbound** models (the result bodies we POST/PUT) are STRICT (``extra="forbid"``): a typo in a
  builder fails in our tests, not silently on a hospital's server. :meth:`ResultPayload.to_wire`
  serialises them with ``exclude_none=True``: Sectra's own TypeScript models declare the optional
  fields (``style``, ``polylines``, ``arcs``, ``id``, ``versionId`` …) as *absent* when unused, so we
  never send ``null`` for them. Empty lists and dicts are sent as they are (``attachments: []``,
  ``data.context: {}``), as in Sectra's examples.
- **Builders** turn a :class:`~slidebridge.analysis.SlideAnalysis` (level-0 px) into results, and a
  **client** (:class:`SectraClient`) talks to ``callbackInfo.url``.

Coordinates (§9): Sectra's points are level-0 pixel coordinates divided by the image **width**, for
x *and* y: ``x = px / W``, ``y = py / W``, so x ∈ [0, 1] and y ∈ [0, H/W]. Patch positions use the
same frame. The inverse is :func:`regions_to_level0`.
"""

from __future__ import annotations

import email.message
import logging
import math
import mimetypes
import re
import ssl
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Literal, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

import slidebridge

# The errors live in the light slidebridge.errors (the api handler maps them without importing this
# module); they stay part of this module's interface through __all__.
from slidebridge.errors import (
    SectraAuthError,
    SectraConflictError,
    SectraError,
    SectraNotFoundError,
    SectraRedirectError,
    SectraUnavailableError,
    UrlNotAllowedError,
)
from slidebridge.outbound import OutboundPolicy, Purpose
from slidebridge.vendors.common import (
    backoff_sleep,
    describe_validation_error,
    fmt_mm2,
    fmt_pct,
    hex_color,
    none_to_dict,
    retryable_status,
)

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

    from slidebridge.analysis import SlideAnalysis, TileResult

__all__ = [
    "IA_API_VERSION",
    "MAX_RESULT_POINTS",
    "SOFTWARE_VERSION",
    "ApiInfo",
    "Arc",
    "Attachment",
    "CallbackInfo",
    "DownloadProgress",
    "ImageNotification",
    "ImageSize",
    "Invocation",
    "Label",
    "PatchAction",
    "PatchCollectionContent",
    "PatchCollectionResult",
    "PatchItem",
    "PatchStatus",
    "Point",
    "Polygon",
    "Polyline",
    "PrimitiveItem",
    "PrimitiveResult",
    "ResultData",
    "ResultPayload",
    "ResultPoint",
    "ResultPolygon",
    "SectraAuthError",
    "SectraClient",
    "SectraConflictError",
    "SectraError",
    "SectraNotFoundError",
    "SectraRedirectError",
    "SectraUnavailableError",
    "SlideInfo",
    "StoredResult",
    "Style",
    "describe_validation_error",
    "headline",
    "message_result",
    "patch_collection_result",
    "placeholder_result",
    "primitive_result",
    "progress_result",
    "regions_to_level0",
    "safe_filename",
    "summary_properties",
]

logger = logging.getLogger(__name__)

# The lowest IA-API version whose features we use (§12): slide info, files and results need 1.5.
# Sent as X-Sectra-ApiVersion on our calls and on our webhook answers (Sectra's examples send the
# app's own versions, not the server's; §4).
IA_API_VERSION = "1.5"
SOFTWARE_VERSION = slidebridge.__version__

# Budget of polygon/polyline vertices in one primitive result. Sectra documents no size limit (§8);
# a viewer draws every vertex, so outlines beyond this are simplified (and the result says so).
MAX_RESULT_POINTS = 20_000
# At most this many class-name labels per class (on its largest polygons), so that a slide with
# hundreds of small regions does not drown in text.
MAX_LABELS_PER_CLASS = 20
# A client with a deadline does not start an attempt with less time than this left.
_MIN_ATTEMPT_S = 0.5
# Normalised coordinates are rounded to 6 decimals: at W = 200 000 px that is 0.2 level-0 px, and it
# keeps the JSON a third shorter than full float repr.
_DECIMALS = 6
# Longest displayResult/label text we send (the annotation list shows one line).
_MAX_TEXT = 200

_HEX_COLOR = r"^#[0-9A-Fa-f]{6}([0-9A-Fa-f]{2})?$"


# =================================================================================================
# Inbound models (lenient)
# =================================================================================================


NoneToDict = Annotated[dict[str, Any], BeforeValidator(none_to_dict)]


def _positive_or_none(value: object) -> object:
    # 0 (or less) is how a server says "unknown resolution"; an invalid value must not reject the
    # whole notification.
    return None if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0 else value


class _Lenient(BaseModel):
    # Numbers where Sectra documents strings (ids) are accepted and kept as text. Error messages
    # never quote the input: it holds the callback token (and may hold PHI).
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True, hide_input_in_errors=True)


class Point(_Lenient):
    """A point in Sectra's normalised frame: level-0 px divided by the image WIDTH (x and y, §9)."""

    x: float = Field(allow_inf_nan=False)
    y: float = Field(allow_inf_nan=False)


class Polygon(_Lenient):
    points: list[Point] = Field(default_factory=list)

    @field_validator("points", mode="before")
    @classmethod
    def _null_points(cls, value: object) -> object:
        return [] if value is None else value

    def as_tuples(self) -> list[tuple[float, float]]:
        return [(p.x, p.y) for p in self.points]


class CallbackInfo(_Lenient):
    url: str = Field(min_length=1)
    # A bearer token for Sectra; SecretStr keeps it out of reprs, logs and tracebacks.
    token: SecretStr


class ImageSize(_Lenient):
    width: int | None = None
    height: int | None = None


class DisplayName(_Lenient):
    displayName: str | None = None


class TileFormat(_Lenient):
    mimeType: str | None = None
    extension: str | None = None


class FileFormat(_Lenient):
    mimeType: str | None = None


class Specimen(_Lenient):
    anatomy: str | None = None
    description: str | None = None


class QualityControlInfo(_Lenient):
    status: str | None = None
    versionId: str | None = None


class SlideInfo(_Lenient):
    """``GET /slides/{id}/info`` and a notification's ``imageInfo`` (§10). Only basic-scope fields
    are named; extended-scope and PHI fields stay in the model's extras if a server sends them."""

    id: str | None = None
    isStreamable: bool | None = None
    imageSize: ImageSize | None = None
    tileSize: ImageSize | None = None
    micronsPerPixel: Annotated[float | None, BeforeValidator(_positive_or_none)] = None
    focalPlanes: list[dict[str, Any]] | None = None
    opticalPaths: list[dict[str, Any]] | None = None
    storedTileFormat: TileFormat | None = None
    availableTileFormats: list[TileFormat] | None = None
    fileFormat: FileFormat | None = None
    staining: DisplayName | None = None
    block: DisplayName | None = None
    specimen: Specimen | None = None
    qualityControl: QualityControlInfo | None = None

    @property
    def dimensions(self) -> tuple[int, int] | None:
        """(width, height) in level-0 px, if the server sent a usable ``imageSize``."""
        size = self.imageSize
        if size is None or not size.width or not size.height or size.width <= 0 or size.height <= 0:
            return None
        return size.width, size.height

    def require_dimensions(self) -> tuple[int, int]:
        """(width, height) in level-0 px, or :class:`SectraError` when the server sent none."""
        dimensions = self.dimensions
        if dimensions is None:
            raise SectraError(f"slide info for {self.id or 'the slide'} has no usable imageSize")
        return dimensions

    @property
    def staining_name(self) -> str | None:
        return None if self.staining is None else self.staining.displayName


class ApiInfo(_Lenient):
    """``GET {cb}/info``, e.g. ``{"apiVersion": "1.10", "softwareVersion": "4.2.0.22617"}``."""

    apiVersion: str | None = None
    softwareVersion: str | None = None


class StoredResult(_Lenient):
    """A result as Sectra stores it (POST/PUT/GET answers; ``input`` of modify/delete).

    Lenient on purpose: ``data`` stays a plain dict so that whatever the server holds (``arcs``,
    primitive ``content`` as an object, fields of newer API versions) survives a round trip.
    """

    id: int | str
    versionId: str | None = None
    slideId: str | None = None
    displayResult: str | None = None
    displayProperties: NoneToDict = Field(default_factory=dict)
    applicationVersion: str | None = None
    attachments: list[Any] | None = None
    data: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready dict with every field and unknown key as received (e.g. the webhook's answer)."""
        return self.model_dump(mode="json")


InputType = Literal["wholeSlide", "taggedPolygon", "multiArea"]
_INPUT_TYPES: frozenset[str] = frozenset({"wholeSlide", "taggedPolygon", "multiArea"})


def _lower(value: object) -> object:
    # Amspath's docs write actions in upper case (§14.13); the wire has lower case. Accept both.
    return value.lower() if isinstance(value, str) else value


class Invocation(_Lenient):
    """``POST U``: a user's ``create`` / ``modify`` / ``cancel`` / ``delete`` (§3).

    ``input`` stays a dict (lenient, round-trips unknown keys); :attr:`input_type`, :meth:`regions`
    and :meth:`stored_result` read it. A ``create`` without ``input`` is taken as ``wholeSlide``.
    """

    action: Annotated[Literal["create", "modify", "cancel", "delete"], BeforeValidator(_lower)]
    applicationId: str = Field(min_length=1)
    slideId: str = Field(min_length=1)
    callbackInfo: CallbackInfo
    context: NoneToDict = Field(default_factory=dict)
    cancellationToken: str | None = None
    input: dict[str, Any] | None = None

    _stored: StoredResult | None = PrivateAttr(default=None)
    _regions: list[list[tuple[float, float]]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check_input(self) -> Self:
        if self.action == "create":
            if self.input is None:
                self.input = {"type": "wholeSlide"}
            self._regions = _parse_create_input(self.input)
        elif self.action in ("modify", "delete") and self.input is not None:
            # The stored result we must correlate by id; one without an id cannot be acted on.
            self._stored = StoredResult.model_validate(self.input)
        return self

    @property
    def input_type(self) -> str | None:
        """``wholeSlide`` | ``taggedPolygon`` | ``multiArea`` for a create, else None."""
        if self.action != "create" or self.input is None:
            return None
        value = self.input.get("type")
        return value if isinstance(value, str) else None

    def regions(self) -> list[list[tuple[float, float]]]:
        """The requested areas as normalised polygons (x/W, y/W); [] for wholeSlide and non-creates."""
        return [list(ring) for ring in self._regions]

    def selected_tag(self) -> str | None:
        """For ``taggedPolygon``: ``content.tags[content.tagIndex]`` (the user's choice), if any."""
        if self.input_type != "taggedPolygon" or self.input is None:
            return None
        content = self.input.get("content") or {}
        tags, index = content.get("tags"), content.get("tagIndex")
        if isinstance(tags, list) and isinstance(index, int) and 0 <= index < len(tags):
            return str(tags[index])
        return None

    def stored_result(self) -> StoredResult | None:
        """For modify/delete: the full stored result Sectra sent as ``input`` (id, versionId …)."""
        return self._stored


def _parse_create_input(data: Mapping[str, Any]) -> list[list[tuple[float, float]]]:
    kind = data.get("type")
    if kind not in _INPUT_TYPES:
        raise ValueError(f"unsupported input type {kind!r} (expected one of {sorted(_INPUT_TYPES)})")
    if kind == "wholeSlide":
        return []
    content = data.get("content")
    if not isinstance(content, Mapping):
        raise ValueError(f"{kind} input without content")
    if kind == "taggedPolygon":
        polygon = Polygon.model_validate(content.get("polygon") or {})
        if len(polygon.points) < 3:
            raise ValueError("taggedPolygon input needs content.polygon with at least 3 points")
        return [polygon.as_tuples()]
    polygons = [Polygon.model_validate(p or {}) for p in content.get("polygons") or []]
    if not polygons:
        raise ValueError("multiArea input needs content.polygons (none given)")
    for i, polygon in enumerate(polygons):
        if len(polygon.points) < 3:
            raise ValueError(f"multiArea polygon {i} has fewer than 3 points")
    return [polygon.as_tuples() for polygon in polygons]


class ImageNotification(_Lenient):
    """``POST U/imagenotification``: new image files were imported (§3). Route on the URL path, not
    on ``action`` (amspath adds ``action: "newImageFiles"``; whether Sectra does is unverified)."""

    applicationId: str = Field(min_length=1)
    slideId: str = Field(min_length=1)
    callbackInfo: CallbackInfo
    context: NoneToDict = Field(default_factory=dict)
    cancellationToken: str | None = None
    imageInfo: SlideInfo | None = None


# =================================================================================================
# Outbound models (strict)
# =================================================================================================


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class ResultPoint(_Strict):
    """A point we send: normalised, x = px/W and y = py/W (W = level-0 width, §9)."""

    x: float = Field(allow_inf_nan=False)
    y: float = Field(allow_inf_nan=False)


class ResultPolygon(_Strict):
    points: list[ResultPoint] = Field(min_length=3)


class Polyline(_Strict):
    points: list[ResultPoint] = Field(min_length=2)


class Arc(_Strict):
    """``radius`` presumably normalised like points (§8, unverified); angles in radians."""

    center: ResultPoint
    radius: float = Field(ge=0, allow_inf_nan=False)
    startAngle: float = Field(allow_inf_nan=False)
    endAngle: float = Field(allow_inf_nan=False)


class Label(_Strict):
    location: ResultPoint  # the label's upper-left corner
    label: str


class Style(_Strict):
    strokeStyle: str | None = Field(default=None, pattern=_HEX_COLOR)
    fillStyle: str | None = Field(default=None, pattern=_HEX_COLOR)
    size: int | None = Field(default=None, ge=0)


class PrimitiveItem(_Strict):
    style: Style | None = None
    polygons: list[ResultPolygon] | None = None
    polylines: list[Polyline] | None = None
    arcs: list[Arc] | None = None
    labels: list[Label] | None = None


class PrimitiveResult(_Strict):
    type: Literal["primitive"] = "primitive"
    # The list form (Sectra's TypeScript models, amspath); Sectra's Python examples send one object.
    content: list[PrimitiveItem]


class PatchItem(_Strict):
    tag: int = Field(ge=0)  # index into PatchCollectionContent.tags
    position: ResultPoint  # the patch centre, normalised like every point
    sortKeyValue: float = Field(allow_inf_nan=False)


class PatchStatus(_Strict):
    value: bool | None = None
    message: str | None = None


class PatchAction(_Strict):
    id: str
    name: str
    tooltip: str  # amspath's models (and so the mock) require it
    state: int = 0


class PatchCollectionContent(_Strict):
    description: str
    polygons: list[ResultPolygon] = Field(min_length=1)  # a gallery expects ≥ 1 polygon (§8)
    patches: list[PatchItem]
    tags: list[str]
    patchSize: int = Field(gt=0)  # px of a patch at ``magnification``
    magnification: float = Field(gt=0, allow_inf_nan=False)  # objective power; 40 ≙ 0.25 µm/px
    statuses: dict[str, PatchStatus] | None = None
    # Always sent, possibly empty: amspath's model (the mock's validator) requires the key.
    actions: list[PatchAction] = Field(default_factory=list)

    @model_validator(mode="after")
    def _tags_exist(self) -> Self:
        for patch in self.patches:
            if patch.tag >= len(self.tags):
                raise ValueError(f"patch tag {patch.tag} is not an index into tags ({len(self.tags)} tags)")
        return self


class PatchCollectionResult(_Strict):
    type: Literal["patchCollection"] = "patchCollection"
    content: PatchCollectionContent


class ResultData(_Strict):
    context: dict[str, Any] = Field(default_factory=dict)
    result: Annotated[PrimitiveResult | PatchCollectionResult, Field(discriminator="type")]


class Attachment(_Strict):
    name: str
    state: Literal["new", "upload-in-progress", "stored"]


class ResultPayload(_Strict):
    """The body of ``POST/PUT /applications/{app}/results[/{id}]`` (§8).

    ``id`` and ``versionId`` are set only on PUT bodies (we send both, §5); on POST they are absent.
    """

    slideId: str = Field(min_length=1)
    displayResult: str
    displayProperties: dict[str, str] = Field(default_factory=dict)
    applicationVersion: str
    attachments: list[Attachment] = Field(default_factory=list)
    data: ResultData
    id: int | str | None = None
    versionId: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready dict: ``None`` fields left out (Sectra models them as absent), lists kept."""
        return self.model_dump(mode="json", exclude_none=True)


# =================================================================================================
# Builders
# =================================================================================================


def _clip_text(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def _norm(x_px: float, y_px: float, width: int) -> ResultPoint:
    """Level-0 px → Sectra's frame: BOTH coordinates divided by the level-0 width W (§9)."""
    return ResultPoint(x=round(x_px / width, _DECIMALS), y=round(y_px / width, _DECIMALS))


def regions_to_level0(
    regions_normalised: Sequence[Sequence[tuple[float, float]]], width: int
) -> list[list[tuple[float, float]]]:
    """Sectra's normalised polygons → level-0 px: ``(x·W, y·W)`` (W = level-0 width, also for y)."""
    if width <= 0:
        raise ValueError(f"slide width must be positive, got {width}")
    return [[(x * width, y * width) for x, y in ring] for ring in regions_normalised]


def _whole_slide_rectangle(width: int, height: int) -> ResultPolygon:
    # (0,0) (1,0) (1,H/W) (0,H/W): Sectra's own whole-slide rectangle (§5).
    return ResultPolygon(
        points=[_norm(0, 0, width), _norm(width, 0, width), _norm(width, height, width), _norm(0, height, width)]
    )


def _status_result(
    slide_id: str,
    width: int,
    height: int,
    *,
    application_version: str,
    text: str,
    properties: dict[str, str],
    stroke: str,
    context: Mapping[str, Any] | None,
) -> ResultPayload:
    if width <= 0 or height <= 0:
        raise ValueError(f"slide size must be positive, got {width} × {height}")
    text = _clip_text(text)
    item = PrimitiveItem(
        style=Style(strokeStyle=stroke),
        polygons=[_whole_slide_rectangle(width, height)],
        # Sectra recommends one label with the displayResult text; upper-left corner at the top-left.
        labels=[Label(location=_norm(0, 0, width), label=text)],
    )
    return ResultPayload(
        slideId=slide_id,
        displayResult=text,
        displayProperties=properties,
        applicationVersion=application_version,
        data=ResultData(context=dict(context or {}), result=PrimitiveResult(content=[item])),
    )


def _pct(progress_pct: float) -> int:
    return max(0, min(100, round(progress_pct)))


def placeholder_result(
    slide_id: str,
    width: int,
    height: int,
    *,
    application_version: str,
    text: str = "Analysis queued",
    progress_pct: float = 0,
    context: Mapping[str, Any] | None = None,
) -> ResultPayload:
    """The result shown while the job waits: whole-slide outline, a label, ``Progress: 0 %``.

    ``width``/``height``: the slide's level-0 size in px (from slide info or ``imageInfo``).
    """
    return _status_result(
        slide_id,
        width,
        height,
        application_version=application_version,
        text=text,
        properties={"Progress": f"{_pct(progress_pct)} %"},
        stroke="#FFA500",
        context=context,
    )


def progress_result(
    slide_id: str,
    width: int,
    height: int,
    *,
    application_version: str,
    progress_pct: float,
    text: str | None = None,
    context: Mapping[str, Any] | None = None,
) -> ResultPayload:
    """Like the placeholder, with ``text`` defaulting to ``"Analysing… 40 %"``."""
    pct = _pct(progress_pct)
    return placeholder_result(
        slide_id,
        width,
        height,
        application_version=application_version,
        text=f"Analysing… {pct} %" if text is None else text,
        progress_pct=pct,
        context=context,
    )


def message_result(
    slide_id: str,
    width: int,
    height: int,
    *,
    application_version: str,
    text: str,
    color: str = "#808080",
    context: Mapping[str, Any] | None = None,
) -> ResultPayload:
    """A terminal status in place of the analysis: "Analysis cancelled", "Analysis failed: …".

    The caller keeps PHI and internals out of ``text``; it is shown to every viewer of the slide.
    """
    if not re.match(_HEX_COLOR, color):
        raise ValueError(f"color must be #RRGGBB[AA], got {color!r}")
    return _status_result(
        slide_id,
        width,
        height,
        application_version=application_version,
        text=text,
        properties={"Status": _clip_text(text)},
        stroke=color,
        context=context,
    )


# --- analysis → result ---------------------------------------------------------------------------


def headline(analysis: SlideAnalysis) -> str:
    """``"Tissue 62 % · cellular 18 %"``: each foreground class's share of the tissue tiles."""
    fractions = analysis.summary.tissue_class_fractions
    parts = [f"{name} {fmt_pct(fractions[name])}" for name in analysis.class_names if name in fractions]
    if not parts:
        return "No tissue detected"
    text = " · ".join(parts)
    return text[:1].upper() + text[1:]


def summary_properties(analysis: SlideAnalysis) -> dict[str, str]:
    """The analysis summary as Sectra ``displayProperties`` (short keys: long ones get truncated)."""
    summary = analysis.summary
    props = {
        "Tissue area": fmt_mm2(summary.tissue_area_mm2),
        "Analysed area": fmt_mm2(summary.analysed_area_mm2),
    }
    for name in analysis.class_names:
        if name in summary.tissue_class_fractions:
            props[name[:1].upper() + name[1:]] = f"{fmt_pct(summary.tissue_class_fractions[name])} of tissue"
    props["Tiles"] = str(summary.tile_count)
    props["Tile"] = f"{analysis.classifier_tile_px} px at {analysis.classifier_mpp:g} µm/px"
    props["Model"] = f"{analysis.application_id} {analysis.application_version}"
    return props


Ring = list[tuple[float, float]]


def _open_ring(ring: Sequence[tuple[float, float]]) -> Ring:
    """Drop the closing duplicate: Sectra polygons are closed implicitly."""
    points = [(float(x), float(y)) for x, y in ring]
    if len(points) > 1 and points[0] == points[-1]:
        points.pop()
    return points


def _seg_dist(p: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    (px, py), (ax, ay), (bx, by) = p, a, b
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    if length2 == 0:
        return math.hypot(px - ax, py - ay)
    t = max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / length2))
    return math.hypot(px - (ax + t * dx), py - (ay + t * dy))


def _douglas_peucker(points: Sequence[tuple[float, float]], tolerance: float) -> Ring:
    """Douglas–Peucker on an open polyline (end points kept); iterative, no recursion limit.

    Written here rather than taken from scikit-image/shapely because this module is imported by
    the API Lambda, whose bundle has neither (nor numpy); outlines are small enough for Python.
    """
    n = len(points)
    if n < 3:
        return list(points)
    keep = [False] * n
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        start, end = stack.pop()
        best, index = -1.0, -1
        for i in range(start + 1, end):
            d = _seg_dist(points[i], points[start], points[end])
            if d > best:
                best, index = d, i
        if index >= 0 and best > tolerance:
            keep[index] = True
            stack.append((start, index))
            stack.append((index, end))
    return [p for p, k in zip(points, keep, strict=True) if k]


def _simplify_ring(ring: Ring, tolerance: float) -> Ring:
    """Simplify a closed ring (given open); [] when it collapses below 3 points."""
    if len(ring) < 3:
        return []
    # Split at the vertex farthest from the first one, so both halves are open polylines.
    far = max(range(len(ring)), key=lambda i: math.dist(ring[0], ring[i]))
    first = _douglas_peucker([*ring[: far + 1]], tolerance)
    second = _douglas_peucker([*ring[far:], ring[0]], tolerance)
    simplified = first[:-1] + second[:-1]
    return simplified if len(simplified) >= 3 else []


def _ring_area(ring: Ring) -> float:
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1], strict=True))) / 2


@dataclass
class _Shape:
    """One region polygon of one class, in level-0 px (open rings)."""

    label: str
    exterior: Ring
    holes: list[Ring]
    area_px: float

    def point_count(self) -> int:
        return len(self.exterior) + sum(len(h) for h in self.holes)


@dataclass
class _Outlines:
    shapes: list[_Shape]
    original_points: int
    simplified: bool = False
    tolerance_px: float = 0.0
    dropped: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def points(self) -> int:
        return sum(s.point_count() for s in self.shapes)


def _outlines(analysis: SlideAnalysis, max_points: int) -> _Outlines:
    """Every foreground polygon, with outlines simplified until they fit ``max_points``.

    Tolerances are in level-0 px, starting at half a tile edge (tile-grid outlines only have
    vertices at tile corners, so that removes the staircase first) and doubling; polygons that
    collapse are dropped, and as a last resort the smallest polygons go.
    """
    shapes = [
        _Shape(
            label=region.label,
            exterior=_simplify_ring(_open_ring(polygon.exterior), 0.5),  # sub-pixel: collinear points only
            holes=[h for h in (_simplify_ring(_open_ring(hole), 0.5) for hole in polygon.holes) if h],
            area_px=_ring_area(_open_ring(polygon.exterior)),
        )
        for region in analysis.foreground_regions()
        for polygon in region.polygons
    ]
    shapes = [s for s in shapes if s.exterior]
    result = _Outlines(shapes=shapes, original_points=sum(s.point_count() for s in shapes))
    if result.points <= max_points:
        return result
    base = [(s.exterior, s.holes) for s in shapes]
    tolerance = min(analysis.tile_width, analysis.tile_height) / 2
    for _ in range(16):
        current = []
        for s, (exterior, holes) in zip(shapes, base, strict=True):
            simple = _simplify_ring(exterior, tolerance)
            if simple:
                kept = [h for h in (_simplify_ring(hole, tolerance) for hole in holes) if h]
                current.append(_Shape(s.label, simple, kept, s.area_px))
        result.shapes, result.simplified, result.tolerance_px = current, True, tolerance
        if result.points <= max_points:
            break
        tolerance *= 2
    if result.points > max_points:
        by_size = sorted(result.shapes, key=lambda s: s.area_px, reverse=True)
        kept_shapes: list[_Shape] = []
        budget = max_points
        for s in by_size:
            if s.point_count() <= budget:
                kept_shapes.append(s)
                budget -= s.point_count()
        result.shapes = kept_shapes
    result.dropped = len(shapes) - len(result.shapes)
    return result


def _outline_note(outlines: _Outlines, analysis: SlideAnalysis) -> str | None:
    if not outlines.simplified:
        return None
    microns = outlines.tolerance_px * analysis.mpp_x
    note = f"simplified to {outlines.points} points (±{microns:.0f} µm)"
    if outlines.dropped:
        note += f", {outlines.dropped} small regions omitted"
    return note


def primitive_result(
    analysis: SlideAnalysis,
    slide_id: str,
    *,
    application_version: str,
    context: Mapping[str, Any] | None = None,
    max_points: int = MAX_RESULT_POINTS,
) -> ResultPayload:
    """Class-coloured region outlines: one item per foreground class, then the headline label.

    Style per class: stroke ``#RRGGBB`` (the class colour), fill ``#RRGGBB40`` (25 % opacity).
    Sectra polygons have no holes, so a region's holes are drawn as closed polylines (outlined, but
    the fill covers them). Labels carry the class name at the upper-left corner of the bounding box
    of each of the class's largest polygons (at most ``MAX_LABELS_PER_CLASS``). Outlines beyond
    ``max_points`` vertices are simplified, and ``displayProperties["Outlines"]`` says so.
    """
    width = analysis.slide_width
    outlines = _outlines(analysis, max_points)
    items: list[PrimitiveItem] = []
    for region in analysis.foreground_regions():
        shapes = [s for s in outlines.shapes if s.label == region.label]
        if not shapes:
            continue
        labelled = sorted(shapes, key=lambda s: s.area_px, reverse=True)[:MAX_LABELS_PER_CLASS]
        holes = [hole for s in shapes for hole in s.holes]
        items.append(
            PrimitiveItem(
                style=Style(strokeStyle=hex_color(region.color), fillStyle=hex_color(region.color, 0x40)),
                polygons=[ResultPolygon(points=[_norm(x, y, width) for x, y in s.exterior]) for s in shapes],
                polylines=[Polyline(points=[_norm(x, y, width) for x, y in [*hole, hole[0]]]) for hole in holes]
                or None,
                # Anchored at the outline's top-most (then left-most) vertex, which lies on the region;
                # the bounding box's corner can be far off an irregular one.
                labels=[
                    Label(location=_norm(*min(s.exterior, key=lambda p: (p[1], p[0])), width), label=region.label)
                    for s in labelled
                ],
            )
        )
    text = headline(analysis)
    items.append(PrimitiveItem(labels=[Label(location=_norm(0, 0, width), label=text)]))
    properties = summary_properties(analysis)
    if (note := _outline_note(outlines, analysis)) is not None:
        properties["Outlines"] = note
    return ResultPayload(
        slideId=slide_id,
        displayResult=_clip_text(text),
        displayProperties=properties,
        applicationVersion=application_version,
        data=ResultData(context=dict(context or {}), result=PrimitiveResult(content=items)),
    )


def _confident_tiles(analysis: SlideAnalysis, label: str, count: int) -> list[tuple[TileResult, float]]:
    k = analysis.class_names.index(label)
    candidates = [(tile, tile.probabilities[k]) for tile in analysis.tiles if tile.label == label]
    # Most probable first; ties in reading order so the gallery is deterministic.
    candidates.sort(key=lambda item: (-item[1], item[0].y, item[0].x))
    return candidates[:count]


def patch_collection_result(
    analysis: SlideAnalysis,
    slide_id: str,
    *,
    application_version: str,
    per_class: int = 8,
    context: Mapping[str, Any] | None = None,
    max_points: int = MAX_RESULT_POINTS,
) -> ResultPayload:
    """A patch gallery: the ``per_class`` most confident tiles of each foreground class.

    - ``tags``: the foreground class names; a patch's ``tag`` is its class's index in ``tags``.
    - ``position``: the tile centre in level-0 px, divided by W (x and y, §9);
      ``sortKeyValue``: the tile's probability for its class (0–1).
    - ``patchSize`` = the classifier's tile edge in px and ``magnification`` = 10 / classifier µm/px
      (objective power: 40× ≙ 0.25 µm/px, 10× ≙ 1 µm/px), so a patch shows exactly the area the
      classifier saw: ``patchSize × classifier_mpp`` µm.
    - ``polygons``: the foreground region outlines (simplified like :func:`primitive_result`), or
      the whole-slide rectangle when there are none (a gallery expects at least one).
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    width = analysis.slide_width
    tags = [name for name in analysis.class_names if name != analysis.background_class]
    patches = [
        PatchItem(
            tag=index,
            position=_norm(tile.x + tile.width / 2, tile.y + tile.height / 2, width),
            sortKeyValue=round(probability, 6),
        )
        for index, name in enumerate(tags)
        for tile, probability in _confident_tiles(analysis, name, per_class)
    ]
    outlines = _outlines(analysis, max_points)
    polygons = [ResultPolygon(points=[_norm(x, y, width) for x, y in s.exterior]) for s in outlines.shapes]
    if not polygons:
        polygons = [_whole_slide_rectangle(width, analysis.slide_height)]
    content = PatchCollectionContent(
        description=_clip_text(
            f"Most confident tiles per class ({analysis.application_id} {analysis.application_version})"
        ),
        polygons=polygons,
        patches=patches,
        tags=tags,
        patchSize=analysis.classifier_tile_px,
        magnification=round(10.0 / analysis.classifier_mpp, 4),
    )
    properties = summary_properties(analysis)
    properties["Patches"] = f"{len(patches)} ({per_class} per class at most)"
    return ResultPayload(
        slideId=slide_id,
        displayResult=_clip_text(headline(analysis)),
        displayProperties=properties,
        applicationVersion=application_version,
        data=ResultData(context=dict(context or {}), result=PatchCollectionResult(content=content)),
    )


# =================================================================================================
# Slide file names
# =================================================================================================

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_NAME_BYTES = 255


def safe_filename(raw: str | None) -> str | None:
    """The last path component of ``raw`` (``\\`` counts as a separator), or None if unusable.

    Unusable: empty, ``.``, ``..`` (after stripping). Control characters become ``_``; names are cut
    to 255 bytes keeping the extension. The result never contains a separator, so joined to the
    download directory it stays inside it.
    """
    if raw is None:
        return None
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = _CONTROL.sub("_", name).strip()
    if name in {"", ".", ".."}:
        return None
    if len(name.encode()) > _MAX_NAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        ext = (dot + ext) if dot and len(ext.encode()) < 16 else ""
        base = stem if ext else name
        while len((base + ext).encode()) > _MAX_NAME_BYTES:
            base = base[:-1]
        name = base + ext
    return name


def _header_params(value: str, header: str = "content-type") -> email.message.Message:
    # The stdlib's header parameter parser handles quoted and unquoted values and RFC 2231.
    message = email.message.Message()
    message[header] = value
    return message


def _disposition_filename(value: str | None) -> str | None:
    if not value:
        return None
    name = _header_params(value, "content-disposition").get_filename()
    return name if isinstance(name, str) else None


# =================================================================================================
# Client
# =================================================================================================

# (bytes received so far, total bytes or None when the server sent no Content-Length)
DownloadProgress = Callable[[int, int | None], None]


_CHUNK = 1 << 20  # 1 MiB reads from the socket, written straight to disk
_MAX_PREAMBLE = 64 * 1024
_DICOM_MAGIC_END = 132  # "DICM" at bytes 128–131 of a DICOM Part 10 file


_M = TypeVar("_M", bound=BaseModel)


class _Ambiguous(Exception):
    """Internal: a POST may or may not have been processed (timeout after sending, 5xx)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SectraClient:
    """A client for one Sectra callback base URL (``callbackInfo.url``) and its bearer token.

    - The constructor does no network I/O; it checks ``callback_url`` against ``policy``
      (:attr:`Purpose.SECTRA_CALLBACK`) and raises :class:`UrlNotAllowedError`. Every request (and
      its resolved addresses) is checked again by the policy's transport; redirects are refused.
    - Every call has a timeout (``timeout_s``) and sends ``Authorization: Bearer``,
      ``X-Sectra-ApiVersion`` (our minimum, :data:`IA_API_VERSION`), ``X-Sectra-SoftwareVersion``
      and ``Accept: application/json`` (the file download accepts its binary types instead).
    - Connection errors, timeouts, 5xx and 429 are retried ``retries`` times with exponential
      backoff from ``backoff_s`` (with jitter; ``Retry-After`` honoured up to 30 s), then raise
      :class:`SectraUnavailableError` (a ``RetryableError``). 401/403 → :class:`SectraAuthError`,
      404 → :class:`SectraNotFoundError`, 409/412 → :class:`SectraConflictError`, 3xx →
      :class:`SectraRedirectError`, other 4xx → :class:`SectraError`; none of those is retried.
    - ``POST /results`` is not idempotent: see :meth:`create_result`.

    Not thread-safe (one ``httpx.Client``); make one per job or request. Close it (context manager).
    """

    def __init__(
        self,
        callback_url: str,
        token: str | SecretStr,
        *,
        policy: OutboundPolicy,
        timeout_s: float = 30.0,
        ca_bundle: Path | None = None,
        retries: int = 3,
        backoff_s: float = 0.5,
        deadline_s: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``deadline_s``: how long all calls of this client may take together, retries and backoff
        included (a webhook must answer within API Gateway's 29 s); None for no limit (the job)."""
        if retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ValueError("retries and backoff_s must be >= 0 and timeout_s > 0")
        self.timeout_s = timeout_s
        self._deadline = None if deadline_s is None else time.monotonic() + deadline_s
        base = callback_url.strip().rstrip("/")
        # Raises UrlNotAllowedError (a UserInputError: the URL came from the request body).
        self.base_url = policy.check(base, Purpose.SECTRA_CALLBACK)
        if "?" in self.base_url or "#" in self.base_url:
            # Paths are appended to the base; a query would end up in the middle of every URL.
            raise UrlNotAllowedError("URL not allowed for sectra_callback: a query string in the callback URL")
        secret = token if isinstance(token, SecretStr) else SecretStr(token)
        self.retries = retries
        self.backoff_s = backoff_s
        headers = {
            "Authorization": f"Bearer {secret.get_secret_value()}",
            "X-Sectra-ApiVersion": IA_API_VERSION,
            "X-Sectra-SoftwareVersion": SOFTWARE_VERSION,
            "Accept": "application/json",
        }
        timeout = httpx.Timeout(timeout_s)
        if transport is not None:
            # Tests inject a transport; the policy's request hook still checks every URL by name.
            self._http = httpx.Client(
                transport=transport,
                headers=headers,
                timeout=timeout,
                follow_redirects=False,
                trust_env=False,
                event_hooks={"request": [policy.request_hook(Purpose.SECTRA_CALLBACK)]},
            )
        else:
            # A per-site CA bundle (hospital-internal CAs, §13); verification is never turned off.
            verify: ssl.SSLContext | bool = True
            if ca_bundle is not None:
                verify = ssl.create_default_context(cafile=str(ca_bundle))
            self._http = policy.client(
                Purpose.SECTRA_CALLBACK,
                verify=verify,
                headers=headers,
                timeout=timeout,
            )

    def __repr__(self) -> str:
        return f"SectraClient({self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.base_url + path

    @staticmethod
    def _raise_for_status(response: httpx.Response, method: str, path: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        where = f"Sectra {method} {path}"
        if 300 <= status < 400:
            raise SectraRedirectError(
                f"{where} answered a redirect ({status}); redirects are refused for Sectra callbacks",
                status=status,
                path=path,
            )
        if status in (401, 403):
            raise SectraAuthError(f"{where}: {status} (callback token refused or expired)", status=status, path=path)
        if status == 404:
            raise SectraNotFoundError(f"{where}: 404 not found", status=status, path=path)
        if status in (409, 412):
            raise SectraConflictError(f"{where}: {status} (stale versionId)", status=status, path=path)
        if retryable_status(status):
            raise SectraUnavailableError(f"{where}: {status}", status=status, path=path)
        raise SectraError(f"{where}: {status}", status=status, path=path)

    def _attempt_timeout(self, method: str, path: str) -> float:
        """The timeout of the next attempt: ``timeout_s``, or what is left of the deadline."""
        if self._deadline is None:
            return self.timeout_s
        left = self._deadline - time.monotonic()
        if left < _MIN_ATTEMPT_S:
            raise SectraUnavailableError(f"Sectra {method} {path}: no time left to try (deadline reached)", path=path)
        return min(self.timeout_s, left)

    def _backoff(self, attempt: int, response: httpx.Response | None = None) -> None:
        left = None if self._deadline is None else max(0.0, self._deadline - time.monotonic() - _MIN_ATTEMPT_S)
        backoff_sleep(self.backoff_s, attempt, response, max_delay_s=left)

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send with retries (safe for GET/PUT); the response body is read."""
        attempts = self.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self._http.request(
                    method, self._url(path), json=json, params=params, timeout=self._attempt_timeout(method, path)
                )
            except httpx.TransportError as exc:
                logger.warning(
                    "Sectra %s %s: %s (attempt %d/%d)", method, path, type(exc).__name__, attempt + 1, attempts
                )
                if last:
                    raise SectraUnavailableError(
                        f"Sectra {method} {path}: {type(exc).__name__} after {attempts} attempts", path=path
                    ) from exc
                self._backoff(attempt)
                continue
            if retryable_status(response.status_code) and not last:
                logger.warning(
                    "Sectra %s %s: %d (attempt %d/%d)", method, path, response.status_code, attempt + 1, attempts
                )
                self._backoff(attempt, response)
                continue
            if retryable_status(response.status_code):
                raise SectraUnavailableError(
                    f"Sectra {method} {path}: {response.status_code} after {attempts} attempts",
                    status=response.status_code,
                    path=path,
                )
            self._raise_for_status(response, method, path)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _json(response: httpx.Response, method: str, path: str) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise SectraError(
                f"Sectra {method} {path}: {response.status_code} with a body that is not JSON", path=path
            ) from exc

    @staticmethod
    def _model(model: type[_M], data: Any, method: str, path: str) -> _M:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            # Field locations only (no input values: they may carry PHI).
            locations = sorted({".".join(str(p) for p in err["loc"]) for err in exc.errors()})
            raise SectraError(
                f"Sectra {method} {path}: unexpected {model.__name__} shape at {', '.join(locations[:5])}", path=path
            ) from None

    @staticmethod
    def _app_path(application_id: str) -> str:
        return f"/applications/{quote(application_id, safe='')}"

    # --- reads -------------------------------------------------------------------------------

    def get_info(self) -> ApiInfo:
        """``GET /info``: the server's IA-API and software versions."""
        response = self._request("GET", "/info")
        return self._model(ApiInfo, self._json(response, "GET", "/info"), "GET", "/info")

    def get_slide_info(self, slide_id: str, *, extended: bool = False) -> SlideInfo:
        """``GET /slides/{id}/info`` (never with ``includePHI``); ``extended`` adds ``scope=extended``."""
        path = f"/slides/{quote(slide_id, safe='')}/info"
        response = self._request("GET", path, params={"scope": "extended"} if extended else None)
        return self._model(SlideInfo, self._json(response, "GET", path), "GET", path)

    def list_results(self, application_id: str, slide_id: str) -> list[StoredResult]:
        """``GET /applications/{app}/results/slide/{slide}``: our results on the slide, oldest first."""
        path = f"{self._app_path(application_id)}/results/slide/{quote(slide_id, safe='')}"
        data = self._json(self._request("GET", path), "GET", path)
        if not isinstance(data, list):
            raise SectraError(f"Sectra GET {path}: expected a list of results", path=path)
        return [self._model(StoredResult, item, "GET", path) for item in data]

    def get_result(self, application_id: str, result_id: int | str) -> StoredResult:
        path = f"{self._app_path(application_id)}/results/{quote(str(result_id), safe='')}"
        return self._model(StoredResult, self._json(self._request("GET", path), "GET", path), "GET", path)

    # --- writes ------------------------------------------------------------------------------

    def create_result(
        self,
        application_id: str,
        payload: ResultPayload,
        *,
        existing_ids: Collection[int | str] | None = None,
    ) -> StoredResult:
        """``POST /applications/{app}/results`` → the stored result (200 or 201 accepted, §6).

        POST is not idempotent. A failure *before* the request was sent (connect error/timeout,
        429) is simply retried. After an ambiguous failure (timeout or connection loss after
        sending, 5xx) the results on the slide are listed again, and a result that looks like ours
        is adopted instead of creating a duplicate: one whose id is not in ``existing_ids`` (the
        ids seen before this create; :meth:`upsert_result` passes them) and whose
        ``displayResult`` and ``applicationVersion`` equal the payload's. Only if none exists is
        the POST sent again.
        """
        path = f"{self._app_path(application_id)}/results"
        body = payload.model_copy(update={"id": None, "versionId": None}).to_wire()
        attempts = self.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self._http.post(self._url(path), json=body, timeout=self._attempt_timeout("POST", path))
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                # Never reached the server: safe to send again.
                outcome: str | httpx.Response | _Ambiguous = type(exc).__name__
            except httpx.TransportError as exc:
                outcome = _Ambiguous(type(exc).__name__)
            else:
                if response.status_code >= 500:
                    outcome = _Ambiguous(str(response.status_code))
                elif response.status_code == 429:
                    outcome = response
                else:
                    self._raise_for_status(response, "POST", path)
                    return self._model(StoredResult, self._json(response, "POST", path), "POST", path)
            reason = (
                outcome.reason
                if isinstance(outcome, _Ambiguous)
                else (outcome if isinstance(outcome, str) else str(outcome.status_code))
            )
            logger.warning("Sectra POST %s: %s (attempt %d/%d)", path, reason, attempt + 1, attempts)
            if isinstance(outcome, _Ambiguous):
                adopted = self._find_created(application_id, payload, existing_ids)
                if adopted is not None:
                    logger.info("Sectra POST %s: adopted result %s created by an unanswered attempt", path, adopted.id)
                    return adopted
            if last:
                raise SectraUnavailableError(f"Sectra POST {path}: {reason} after {attempts} attempts", path=path)
            self._backoff(attempt, outcome if isinstance(outcome, httpx.Response) else None)
        raise AssertionError("unreachable")  # pragma: no cover

    def _find_created(
        self, application_id: str, payload: ResultPayload, existing_ids: Collection[int | str] | None
    ) -> StoredResult | None:
        known = {str(i) for i in existing_ids or ()}
        try:
            results = self.list_results(application_id, payload.slideId)
        except SectraUnavailableError:
            return None  # still down: the next POST attempt (or the caller's retry) decides
        for result in reversed(results):
            if (
                str(result.id) not in known
                and result.displayResult == payload.displayResult
                and result.applicationVersion == payload.applicationVersion
            ):
                return result
        return None

    def update_result(
        self, application_id: str, result_id: int | str, payload: ResultPayload | StoredResult
    ) -> StoredResult:
        """``PUT /applications/{app}/results/{id}`` with the payload's ``versionId`` (required).

        The body carries ``id`` and ``versionId`` (Sectra's examples PUT the whole object with its
        id; amspath sends versionId only: both is safest, §5). A stale versionId raises
        :class:`SectraConflictError`. A 2xx without a body is answered by a GET of the result.
        A :class:`StoredResult` (e.g. a pathologist's edit arriving as ``modify``) is sent back as
        received, unknown fields included, since our strict models may not describe it.
        """
        if payload.versionId is None:
            raise ValueError("update_result needs payload.versionId (the stored result's current version)")
        path = f"{self._app_path(application_id)}/results/{quote(str(result_id), safe='')}"
        if isinstance(payload, StoredResult):
            body = payload.to_wire() | {"id": result_id}
        else:
            body = payload.model_copy(update={"id": result_id}).to_wire()
        response = self._request("PUT", path, json=body)
        if response.status_code == 204 or not response.content.strip():
            return self.get_result(application_id, result_id)
        return self._model(StoredResult, self._json(response, "PUT", path), "PUT", path)

    def upsert_result(
        self,
        application_id: str,
        slide_id: str,
        payload: ResultPayload,
        *,
        current: StoredResult | None = None,
    ) -> StoredResult:
        """Create or update our result on the slide (§5); returns the stored result (new versionId).

        With ``current`` (the result we stored last): PUT with its id and versionId. Without: list
        our results on the slide; the last one is PUT, or, when there is none, one is POSTed. On a
        stale versionId (409/412) the results are listed again and the PUT retried once. A 404
        (the user deleted our result) is raised, not papered over with a new result.
        """
        if payload.slideId != slide_id:
            raise ValueError("payload.slideId must be the slide being upserted")
        for attempt in range(2):
            seen: list[StoredResult] = []
            if current is None:
                seen = self.list_results(application_id, slide_id)
                current = seen[-1] if seen else None
            if current is None:
                return self.create_result(application_id, payload, existing_ids=[r.id for r in seen])
            body = payload.model_copy(update={"id": current.id, "versionId": current.versionId or ""})
            try:
                return self.update_result(application_id, current.id, body)
            except SectraConflictError:
                if attempt == 1:
                    raise
                logger.info("Sectra result %s: stale versionId, listing again", current.id)
                current = None
        raise AssertionError("unreachable")  # pragma: no cover

    # --- slide files -------------------------------------------------------------------------

    def download_slide_files(
        self, slide_id: str, dest_dir: Path, *, progress: DownloadProgress | None = None
    ) -> list[Path]:
        """``GET /slides/{id}/files`` streamed to ``dest_dir``; the written files, in order (§7).

        - ``multipart/related`` (a DICOM series: one part per file) and any other ``multipart/*``
          with a boundary (the mock's ``multipart/form-data``): each part goes to its own file,
          parsed incrementally (python-multipart, which keeps a boundary-length overlap across
          chunk edges), so memory stays at one chunk whatever the slide size.
        - anything else (``application/octet-stream`` …): one file named by the top-level
          ``Content-Disposition`` filename (quoted or not).
        - names: :func:`safe_filename` (last component only; unusable names become ``file-N``),
          de-duplicated (``name-2.ext``), never overwriting a file already in ``dest_dir``. A
          DICOM part (``DICM`` magic) without ``.dcm`` gets it, as Sectra's own downloader does
          (OpenSlide 4 sniffs content and opens extensionless series too; tools and people look at
          the extension).
        - connection errors, timeouts, 5xx and 429 (also mid-body) remove what this attempt wrote
          and start again, up to ``retries`` times.
        """
        path = f"/slides/{quote(slide_id, safe='')}/files"
        dest_dir.mkdir(parents=True, exist_ok=True)
        attempts = self.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            sink = _FileSink(dest_dir)
            try:
                with self._http.stream(
                    "GET",
                    self._url(path),
                    headers={"Accept": "multipart/related, application/octet-stream, */*"},
                ) as response:
                    if retryable_status(response.status_code) and not last:
                        sink.discard()
                        logger.warning(
                            "Sectra GET %s: %d (attempt %d/%d)", path, response.status_code, attempt + 1, attempts
                        )
                        backoff_sleep(self.backoff_s, attempt, response)
                        continue
                    self._raise_for_status(response, "GET", path)
                    _write_body(response, sink, slide_id=slide_id, path=path, progress=progress)
                    return sink.paths
            except httpx.TransportError as exc:
                sink.discard()
                logger.warning("Sectra GET %s: %s (attempt %d/%d)", path, type(exc).__name__, attempt + 1, attempts)
                if last:
                    raise SectraUnavailableError(
                        f"Sectra GET {path}: {type(exc).__name__} after {attempts} attempts", path=path
                    ) from exc
                backoff_sleep(self.backoff_s, attempt)
            except _TruncatedError as exc:
                sink.discard()
                logger.warning("Sectra GET %s: %s (attempt %d/%d)", path, exc, attempt + 1, attempts)
                if last:
                    raise SectraUnavailableError(
                        f"Sectra GET {path}: {exc} after {attempts} attempts", path=path
                    ) from exc
                backoff_sleep(self.backoff_s, attempt)
            except BaseException:
                sink.discard()
                raise
        raise AssertionError("unreachable")  # pragma: no cover


class _TruncatedError(Exception):
    """Internal: the body ended before the multipart closing boundary (a dropped connection)."""


class _FileSink:
    """Files of one download attempt: unique safe names inside ``dest_dir``, removable as a whole."""

    def __init__(self, dest_dir: Path) -> None:
        self.dest_dir = dest_dir
        self.paths: list[Path] = []
        self._file: BinaryIO | None = None
        self._head = b""

    def open(self, raw_name: str | None, fallback: str) -> None:
        name = safe_filename(raw_name) or fallback
        self._file = self._create(name)
        self._head = b""

    def _create(self, name: str) -> BinaryIO:
        stem, dot, ext = name.rpartition(".")
        if not dot or not stem:
            stem, ext = name, ""
        else:
            ext = "." + ext
        for n in range(1, 10_000):
            candidate = self.dest_dir / (name if n == 1 else f"{stem}-{n}{ext}")
            try:
                # "x": never overwrite (a name seen twice, or a file already in the directory).
                file = candidate.open("xb")
            except FileExistsError:
                continue
            self.paths.append(candidate)
            return file
        raise SectraError(f"cannot find a free file name for {name!r} in the download directory")

    def write(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        if len(self._head) < _DICOM_MAGIC_END:
            self._head += bytes(data[: _DICOM_MAGIC_END - len(self._head)])
        self._file.write(data)

    def close_part(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        current = self.paths[-1]
        if self._head[128:132] == b"DICM" and current.suffix.lower() != ".dcm":
            # Sectra's downloader appends ".dcm" to multipart DICOM part names; so do we.
            target_name = current.name + ".dcm"
            self.paths.pop()
            renamed = self._create(target_name)
            renamed.close()
            current.replace(self.paths[-1])

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for written in self.paths:
            written.unlink(missing_ok=True)
        self.paths = []


def _write_body(
    response: httpx.Response, sink: _FileSink, *, slide_id: str, path: str, progress: DownloadProgress | None
) -> None:
    content_type = response.headers.get("content-type", "application/octet-stream")
    params = _header_params(content_type)
    media_type = params.get_content_type()
    length = response.headers.get("content-length")
    total = int(length) if length and length.isdigit() else None
    received = 0

    def chunks() -> Iterator[bytes]:
        nonlocal received
        for chunk in response.iter_bytes(_CHUNK):
            received += len(chunk)
            if progress is not None:
                progress(received, total)
            yield chunk

    if media_type.startswith("multipart/"):
        boundary = params.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise SectraError(f"Sectra GET {path}: {media_type} response without a boundary", path=path)
        _write_multipart(chunks(), boundary.strip('"'), sink, path=path)
        return
    if media_type in ("application/json", "text/html", "text/plain"):
        raise SectraError(f"Sectra GET {path}: {media_type} instead of slide files", path=path)
    name = _disposition_filename(response.headers.get("content-disposition"))
    guessed = mimetypes.guess_extension(media_type) or ""
    sink.open(name, safe_filename(slide_id + guessed) or f"slide{guessed}")
    for chunk in chunks():
        sink.write(chunk)
    sink.close_part()


def _write_multipart(chunks: Iterator[bytes], boundary: str, sink: _FileSink, *, path: str) -> None:
    # python-multipart is imported here, not at module level: only the batch job downloads slides,
    # and the API Lambda (which imports this module for the models) does not ship it.
    from python_multipart.exceptions import MultipartParseError  # noqa: PLC0415
    from python_multipart.multipart import MultipartParser  # noqa: PLC0415

    state: dict[str, Any] = {"field": b"", "value": b"", "headers": {}, "parts": 0, "ended": False}

    def on_part_begin() -> None:
        state["headers"] = {}
        state["field"] = state["value"] = b""

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        name = state["field"].decode("latin-1").strip().lower()
        state["headers"][name] = state["value"].decode("utf-8", "replace").strip()
        state["field"] = state["value"] = b""

    def on_headers_finished() -> None:
        state["parts"] += 1
        name = _disposition_filename(state["headers"].get("content-disposition"))
        sink.open(name, f"file-{state['parts']}")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        sink.write(memoryview(data)[start:end])

    def on_part_end() -> None:
        sink.close_part()

    def on_end() -> None:
        state["ended"] = True

    callbacks: MultipartCallbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_end": on_end,
    }
    parser = MultipartParser(boundary.encode("latin-1"), callbacks, max_header_count=64)
    delimiter = b"--" + boundary.encode("latin-1")
    # RFC 2046 allows a preamble before the first delimiter; python-multipart does not, so it is
    # skipped here (bounded, so a body without any delimiter fails fast).
    head = b""
    started = False
    try:
        for chunk in chunks:
            data = chunk
            if not started:
                head += chunk
                index = head.find(delimiter)
                if index < 0:
                    if len(head) > _MAX_PREAMBLE:
                        raise SectraError(f"Sectra GET {path}: multipart body without its boundary", path=path)
                    continue
                started, data, head = True, head[index:], b""
            parser.write(data)
    except MultipartParseError as exc:
        raise SectraError(f"Sectra GET {path}: malformed multipart body ({exc})", path=path) from None
    if not state["ended"]:
        raise _TruncatedError("multipart body ended before its closing boundary")
