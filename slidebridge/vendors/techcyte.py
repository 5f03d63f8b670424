"""Techcyte API bridge (external-model webhook): wire models, result builders and our httpx client.

Facts and their sources are in ``vendors/TECHCYTE.md`` (the "fact sheet"; § numbers below refer to it).
We do not reuse the public example client (§12): it logs secrets, has no timeouts or retries and
replaces the task JWT with the API-key token.

- **Inbound**: :class:`WebhookPayload` is LENIENT (unknown keys kept, almost everything optional,
  ``scan_urls`` preferred over ``scans``). It rejects only what we cannot act on (no ``task_id``, no
  scan, a scan without a URL). Its errors never quote input values (the JWT, presigned URLs): answer
  with :func:`describe_validation_error`. Unknown (§11): no signature or auth header is documented.
- **Outbound**: the ``POST /external/results/{task_id}`` body (:class:`ResultsPayload`) is STRICT
  (``extra="forbid"``) and encodes the server rules of §5/§7 that we can check locally, so a builder
  bug fails in our tests and not as an all-or-nothing 4xx on the customer's server.
- **Builders** turn a :class:`~slidebridge.analysis.SlideAnalysis` into a :class:`ScanResult`.
- **Client**: :class:`TechcyteClient` (token, results, case evaluations, triage).

Coordinates (§9): level-0 pixels of the slide, origin top-left, x right, y down, rounded to
integers; ``bbox`` is ``[x_min, y_min, x_max, y_max]``. This is NOT Sectra's frame (normalised by
width): no coordinate code is shared with ``vendors/sectra.py``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self
from urllib.parse import quote

import httpx
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from slidebridge.errors import RetryableError, SlidebridgeError
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
    from slidebridge.analysis import RegionPolygon, SlideAnalysis
    from slidebridge.settings import Settings

__all__ = [
    "KNOWN_REPORT_TYPES",
    "MAX_FEATURES",
    "RUN_MARKER_KEY",
    "BasicReport",
    "CaseEvaluation",
    "Feature",
    "FeatureCollection",
    "FeatureProperties",
    "PolygonGeometry",
    "ReportLine",
    "ResultsPayload",
    "ScanResult",
    "ScanResults",
    "Segment",
    "Stain",
    "TechcyteAuthError",
    "TechcyteClient",
    "TechcyteError",
    "TechcyteOutcomeUnknownError",
    "TechcyteRejectedError",
    "TechcyteUnavailableError",
    "WebhookPayload",
    "Workflow",
    "annotation_type_of",
    "decode_global_id",
    "describe_validation_error",
    "failed_scan_result",
    "payload_for",
    "scan_result",
    "scan_results_by_id",
    "task_number",
]

logger = logging.getLogger(__name__)

# The report types the server knows (§5.1); any other rejects the whole request. We only build Basic.
KNOWN_REPORT_TYPES = frozenset(
    {
        "Basic",
        "WholeSlideDifferential",
        "AreaDifferential",
        "SemiQuantitativeDifferential",
        "RegionCounting",
        "AiMitosisCounting",
        "TumorCellularity",
    }
)
# Key under ``results`` that carries our run id: it is stored in ``details.report`` (§8), so after an
# ambiguous POST failure ``GET case_evaluations`` tells whether the POST went through.
RUN_MARKER_KEY = "slidebridge_run"
# No size limit is documented (§5.2, §11): keep at most this many polygons (the largest) per scan.
MAX_FEATURES = 2000


# =================================================================================================
# Errors
# =================================================================================================


class TechcyteError(SlidebridgeError):
    """A call to Techcyte failed. The message names the method, path and status; never the token,
    the client secret or a presigned URL."""

    def __init__(self, message: str, *, status: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.path = path


class TechcyteAuthError(TechcyteError):
    """401/403 that a fresh token did not cure, or a refused client-credentials exchange."""


class TechcyteRejectedError(TechcyteError):
    """Another 4xx: permanent (validation is all-or-nothing, §7); never retried."""


class TechcyteUnavailableError(TechcyteError, RetryableError):
    """Connection errors, timeouts, 5xx or 429 persisted through every retry; nothing was stored."""


class TechcyteOutcomeUnknownError(TechcyteError, RetryableError):
    """A results POST may or may not have been stored (timeout after sending, 5xx) and we could not
    tell. Before any retry, check :meth:`TechcyteClient.find_posted` (posting twice appends, §7)."""


# =================================================================================================
# Global ids
# =================================================================================================


def decode_global_id(value: str) -> tuple[str, int] | None:
    """``"dGFzazoxODU3MTQ="`` → ``("task", 185714)``; None when ``value`` is not a base64 global id."""
    text = value.strip()
    try:
        decoded = base64.b64decode(text + "=" * (-len(text) % 4), validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    kind, sep, number = decoded.partition(":")
    if not sep or not kind or not number.isdigit():
        return None
    return kind, int(number)


def task_number(task_id: str) -> int | None:
    """The integer task id: ``task_id`` may be the plain integer or the base64 ``task:<n>`` (§5)."""
    text = task_id.strip()
    if text.isdigit():
        return int(text)
    decoded = decode_global_id(text)
    return decoded[1] if decoded is not None and decoded[0] == "task" else None


# =================================================================================================
# Inbound (lenient)
# =================================================================================================


class _Lenient(BaseModel):
    # Ids as numbers are kept as text. Errors never quote the input (JWT, presigned URLs).
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True, hide_input_in_errors=True)


def _blank_to_none(value: object) -> object:
    return None if isinstance(value, str) and not value.strip() else value


NoneToDict = Annotated[dict[str, Any], BeforeValidator(none_to_dict)]
OptionalText = Annotated[str | None, BeforeValidator(_blank_to_none)]


class Stain(_Lenient):
    """``stains[scan_id]``: ``value`` is free text; code and label only for a configured stain."""

    value: str | None = None
    stain_code: str | None = None
    label: str | None = None


class WebhookPayload(_Lenient):
    """The body Techcyte POSTs to our webhook (§2). Key everything on :attr:`task_id`."""

    task_id: str = Field(min_length=1)
    case_id: OptionalText = None
    company_id: OptionalText = None
    scans: Annotated[dict[str, str], BeforeValidator(none_to_dict)] = Field(default_factory=dict)
    scan_urls: Annotated[dict[str, list[str]], BeforeValidator(none_to_dict)] = Field(default_factory=dict)
    stains: Annotated[dict[str, Stain], BeforeValidator(none_to_dict)] = Field(default_factory=dict)
    # The docs say model_id, every example sends model_name (§2, §11): both optional.
    model_id: OptionalText = None
    model_name: OptionalText = None
    # Task-specific JWT; absent from debug payloads. SecretStr keeps it out of reprs and logs.
    jwt_token: Annotated[SecretStr | None, BeforeValidator(_blank_to_none)] = None

    @field_validator("task_id")
    @classmethod
    def _strip(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("task_id is blank")
        return value.strip()

    @model_validator(mode="after")
    def _scans(self) -> Self:
        ids = self.scan_ids()
        if not ids:
            raise ValueError("no scan: neither scans nor scan_urls lists one")
        for scan_id in ids:
            if not scan_id.isdigit():
                raise ValueError(f"scan id {scan_id!r} is not numeric")
            if not self.urls(scan_id):
                raise ValueError(f"scan {scan_id} has no download URL")
        return self

    def scan_ids(self) -> list[str]:
        """Every scan of the task: those of ``scan_urls``, then any only in ``scans``."""
        ids = list(self.scan_urls)
        ids += [scan_id for scan_id in self.scans if scan_id not in self.scan_urls]
        return ids

    def urls(self, scan_id: str) -> list[str]:
        """Every presigned URL of the scan (a DICOM series has several): ``scan_urls`` first,
        ``scans`` (the first URL only) as the fallback for older payloads."""
        urls = [url for url in self.scan_urls.get(scan_id, []) if url.strip()]
        if urls:
            return urls
        first = self.scans.get(scan_id, "")
        return [first] if first.strip() else []

    def stain_of(self, scan_id: str) -> str | None:
        stain = self.stains.get(scan_id)
        return None if stain is None else (stain.stain_code or stain.value)

    @property
    def model(self) -> str | None:
        """The user-supplied model key (``model_id``, else ``model_name``), if any."""
        return self.model_id or self.model_name

    @property
    def task_number(self) -> int | None:
        return task_number(self.task_id)

    def log_context(self) -> dict[str, Any]:
        """What may be logged: ids only (no JWT, no presigned URL)."""
        return {
            "task_id": self.task_id,
            "case_id": self.case_id,
            "company_id": self.company_id,
            "scan_ids": self.scan_ids(),
            "has_jwt": self.jwt_token is not None,
        }


class CaseEvaluation(_Lenient):
    """One item of ``GET /external/case_evaluations/{task_id}`` (§6): every evaluation on the case,
    other tasks' and humans' included. ``task_id``/``sample_id`` are integers on the wire."""

    id: str | None = None
    sample_id: str | None = None
    case_id: str | None = None
    task_id: str | None = None
    details: NoneToDict = Field(default_factory=dict)

    @property
    def report(self) -> dict[str, Any]:
        """Our ``results`` object minus ``external_url`` (the workflow is not included)."""
        report = self.details.get("report")
        return report if isinstance(report, dict) else {}


# =================================================================================================
# Outbound (strict)
# =================================================================================================


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


# A position [x, y] in level-0 px, integers (§9).
Position = tuple[int, int]


class PolygonGeometry(_Strict):
    type: Literal["Polygon"] = "Polygon"
    # Exterior ring, then holes; every ring closed (first position == last).
    coordinates: list[list[Position]]

    @field_validator("coordinates")
    @classmethod
    def _closed(cls, rings: list[list[Position]]) -> list[list[Position]]:
        if not rings:
            raise ValueError("a polygon needs an exterior ring")
        for ring in rings:
            if len(ring) < 4 or ring[0] != ring[-1]:
                raise ValueError("polygon rings must be closed and have at least 4 positions")
        return rings


class FeatureProperties(_Strict):
    # Required on every TOP-LEVEL geojson feature (§5.2); features inside workflow segments carry
    # name/color only, as in Techcyte's examples.
    annotation_type: str | None = None
    name: str | None = None
    color: str | None = Field(default=None, pattern=r"^#[0-9A-Fa-f]{6}$")
    area_mm2: float | None = Field(default=None, ge=0.0)


class Feature(_Strict):
    type: Literal["Feature"] = "Feature"
    # [x_min, y_min, x_max, y_max] in level-0 px: always sent (the stored bbox comes from it, §5.2).
    bbox: tuple[int, int, int, int]
    geometry: PolygonGeometry
    properties: FeatureProperties

    @model_validator(mode="after")
    def _bbox_encloses(self) -> Self:
        # The public example has a vertex outside its own bbox (§12.12): never send that.
        x0, y0, x1, y1 = self.bbox
        if x0 > x1 or y0 > y1:
            raise ValueError("bbox must be [x_min, y_min, x_max, y_max]")
        for ring in self.geometry.coordinates:
            for x, y in ring:
                if not (x0 <= x <= x1 and y0 <= y <= y1):
                    raise ValueError("a polygon vertex lies outside the feature's bbox")
        return self


class FeatureCollection(_Strict):
    type: Literal["FeatureCollection"] = "FeatureCollection"
    features: list[Feature] = Field(default_factory=list)


class ReportLine(_Strict):
    name: str
    result: str


class Segment(_Strict):
    name: str
    result: str
    feature_collection: FeatureCollection


class BasicReport(_Strict):
    type: Literal["Basic"] = "Basic"
    results: list[ReportLine]
    segments: list[Segment]


class Workflow(_Strict):
    """AiWorkflow (§5.1). ``ruo`` is a bool (early docs showed the string ``"True"``: wrong)."""

    model_name: str = Field(min_length=1)
    provider: str = Field(min_length=1)
    ruo: bool = Field(strict=True)
    key: str | None = None
    value: str | None = None
    report: BasicReport

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.key is None) != (self.value is None):
            raise ValueError("workflow key and value go together")
        return self


_Scalar = str | int | float | bool


class ScanResults(BaseModel):
    """``results``: ``summary`` is shown on top of the AI panel, ``external_url`` as a link, every
    other key (scalars only, by our choice) in the per-scan details. A non-string summary would
    reject the whole request (§5.1), hence ``summary: str``."""

    model_config = ConfigDict(extra="allow", hide_input_in_errors=True)

    summary: str = Field(min_length=1)
    external_url: str | None = None

    @model_validator(mode="after")
    def _scalar_extras(self) -> Self:
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, _Scalar):
                raise ValueError(f"results.{key} must be a string, number or bool")
        return self


class ScanResult(_Strict):
    scanId: str = Field(pattern=r"^[0-9]+$")  # numeric STRING; must belong to the task
    results: ScanResults
    workflow: Workflow | None = None
    geojson: FeatureCollection | None = None
    # None: QC untouched; []: a QC pass; reasons: stored (as "other" when not a configured label).
    qcFailReasons: list[str] | None = None

    @model_validator(mode="after")
    def _annotation_types(self) -> Self:
        # A top-level feature without a string annotation_type rejects the whole request (§5.2).
        for feature in self.geojson.features if self.geojson is not None else []:
            if not feature.properties.annotation_type:
                raise ValueError("every top-level geojson feature needs properties.annotation_type")
        return self


class ResultsPayload(_Strict):
    """The body of ``POST /external/results/{task_id}``: one scanResult per scan, all in ONE post
    (posting completes the scans and appends, §7). ``caseResults`` is deprecated: never sent."""

    scanResults: list[ScanResult] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        ids = [scan.scanId for scan in self.scanResults]
        if len(set(ids)) != len(ids):
            raise ValueError("one scanResult per scan: a scanId repeats")
        return self

    def run_id(self) -> str | None:
        """Our run marker, when every scanResult carries the same one."""
        markers = {(scan.results.model_extra or {}).get(RUN_MARKER_KEY) for scan in self.scanResults}
        marker = markers.pop() if len(markers) == 1 else None
        return marker if isinstance(marker, str) else None

    def to_wire(self) -> dict[str, Any]:
        # Absent, not null, for unused optional fields; qcFailReasons None means "QC untouched" and
        # is as good absent as null (§5.1).
        return self.model_dump(mode="json", exclude_none=True)


# =================================================================================================
# Builders
# =================================================================================================


def _title(name: str) -> str:
    return name[:1].upper() + name[1:]


_SLUG = re.compile(r"[^a-z0-9]+")


def annotation_type_of(label: str) -> str:
    """``"Cellular tissue"`` → ``"cellular_tissue"``: the ``annotation_type`` of a class's features."""
    return _SLUG.sub("_", label.lower()).strip("_") or "region"


def _headline(analysis: SlideAnalysis) -> str:
    fractions = analysis.summary.tissue_class_fractions
    parts = [f"{name} {fmt_pct(fractions[name])}" for name in analysis.class_names if name in fractions]
    return _title("; ".join(parts)) if parts else "No tissue detected"


def _feature(polygon: RegionPolygon, properties: FeatureProperties) -> Feature:
    # Rounding each vertex to the nearest level-0 px keeps rings closed (equal points round alike).
    rings = [[(round(x), round(y)) for x, y in ring] for ring in [polygon.exterior, *polygon.holes]]
    xs = [x for x, _ in rings[0]]
    ys = [y for _, y in rings[0]]
    return Feature(
        bbox=(min(xs), min(ys), max(xs), max(ys)),
        geometry=PolygonGeometry(coordinates=rings),
        properties=properties,
    )


def _kept_polygons(analysis: SlideAnalysis, max_features: int) -> tuple[dict[str, list[RegionPolygon]], int]:
    """The foreground polygons per class, the largest ``max_features`` overall; and how many were dropped."""
    ranked = [
        (polygon.area_mm2, index, region.label, polygon)
        for region in analysis.foreground_regions()
        for index, polygon in enumerate(region.polygons)
    ]
    ranked.sort(key=lambda item: (-item[0], item[2], item[1]))
    kept: dict[str, list[RegionPolygon]] = {region.label: [] for region in analysis.foreground_regions()}
    for _, _, label, polygon in ranked[:max_features]:
        kept[label].append(polygon)
    return kept, max(0, len(ranked) - max_features)


def scan_result(
    analysis: SlideAnalysis,
    scan_id: str,
    *,
    model_name: str,
    provider: str,
    min_tissue_mm2: float,
    ruo: bool = True,
    run_id: str | None = None,
    headline_class: str | None = None,
    external_url: str | None = None,
    max_features: int = MAX_FEATURES,
) -> ScanResult:
    """One scan's result: summary, details, a Basic workflow report with one segment per foreground
    class, one top-level GeoJSON feature per region polygon (level-0 px, ``annotation_type`` = the
    class), and ``qcFailReasons`` ``[]`` (pass) or ``["insufficient_tissue"]`` when the detected tissue
    area is below ``min_tissue_mm2``.

    ``headline_class``: the class whose share of the tissue is the workflow's key/value headline
    (e.g. ``"cellular"`` → ``"Cellular fraction": "18 %"``); by default the tissue area.
    """
    summary = analysis.summary
    insufficient = summary.tissue_area_mm2 < min_tissue_mm2
    headline = _headline(analysis)
    if insufficient:
        # Say so first: a figure computed on too little tissue must not read as a diagnosis (§8).
        headline = (
            f"QC failed: insufficient tissue ({fmt_mm2(summary.tissue_area_mm2)} detected, "
            f"{fmt_mm2(min_tissue_mm2)} required). {headline}"
        )
    kept, dropped = _kept_polygons(analysis, max_features)
    if dropped:
        headline += f" ({dropped} small regions not drawn)"

    details: dict[str, _Scalar] = {
        "tissue_area_mm2": round(summary.tissue_area_mm2, 3),
        "analysed_area_mm2": round(summary.analysed_area_mm2, 3),
        "tile_count": summary.tile_count,
        "model_version": f"{analysis.application_id} {analysis.application_version}",
    }
    for name in analysis.class_names:
        if name in summary.tissue_class_fractions:
            details[f"{annotation_type_of(name)}_fraction"] = round(summary.tissue_class_fractions[name], 4)
    if run_id is not None:
        details[RUN_MARKER_KEY] = run_id
    results = ScanResults(summary=headline, external_url=external_url, **details)

    lines = [
        ReportLine(name="Tissue area", result=fmt_mm2(summary.tissue_area_mm2)),
        ReportLine(name="Analysed area", result=fmt_mm2(summary.analysed_area_mm2)),
    ]
    lines += [
        ReportLine(name=_title(name), result=f"{fmt_pct(summary.tissue_class_fractions[name])} of tissue")
        for name in analysis.class_names
        if name in summary.tissue_class_fractions
    ]
    lines.append(ReportLine(name="Model", result=f"{analysis.application_id} {analysis.application_version}"))

    segments: list[Segment] = []
    features: list[Feature] = []
    for region in analysis.foreground_regions():
        color = hex_color(region.color)
        fraction = summary.tissue_class_fractions.get(region.label)
        segments.append(
            Segment(
                name=_title(region.label),
                result=fmt_pct(fraction) if fraction is not None else fmt_mm2(region.area_mm2),
                feature_collection=FeatureCollection(
                    features=[
                        _feature(polygon, FeatureProperties(name=_title(region.label), color=color))
                        for polygon in kept[region.label]
                    ]
                ),
            )
        )
        features += [
            _feature(
                polygon,
                FeatureProperties(
                    annotation_type=annotation_type_of(region.label),
                    name=_title(region.label),
                    color=color,
                    area_mm2=round(polygon.area_mm2, 4),
                ),
            )
            for polygon in kept[region.label]
        ]

    key, value = "Tissue area", fmt_mm2(summary.tissue_area_mm2)
    if headline_class is not None and headline_class in summary.tissue_class_fractions:
        key, value = f"{_title(headline_class)} fraction", fmt_pct(summary.tissue_class_fractions[headline_class])
    return ScanResult(
        scanId=scan_id,
        results=results,
        workflow=Workflow(
            model_name=model_name,
            provider=provider,
            ruo=ruo,
            key=key,
            value=value,
            report=BasicReport(results=lines, segments=segments),
        ),
        geojson=FeatureCollection(features=features),
        qcFailReasons=["insufficient_tissue"] if insufficient else [],
    )


def failed_scan_result(
    scan_id: str,
    message: str,
    *,
    model_name: str,
    provider: str,
    ruo: bool = True,
    run_id: str | None = None,
) -> ScanResult:
    """A result for a scan we could not analyse: it completes the scan (so the task does not hang),
    says why in the summary, carries no figures or shapes, and ``qcFailReasons: ["analysis_failed"]``
    (stored as free-text "other" unless the company configured that label).

    ``message`` is shown to lab users: pass a short reason (an error code's text), never a URL,
    token or stack trace.
    """
    text = " ".join(message.split())[:300] or "unknown error"
    extras: dict[str, _Scalar] = {"status": "analysis_failed"}
    if run_id is not None:
        extras[RUN_MARKER_KEY] = run_id
    return ScanResult(
        scanId=scan_id,
        results=ScanResults(summary=f"Analysis failed: {text}. No result was produced for this scan.", **extras),
        workflow=Workflow(
            model_name=model_name,
            provider=provider,
            ruo=ruo,
            key="Status",
            value="Analysis failed",
            report=BasicReport(results=[ReportLine(name="Status", result=f"Analysis failed: {text}")], segments=[]),
        ),
        qcFailReasons=["analysis_failed"],
    )


# =================================================================================================
# Client
# =================================================================================================


_JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]*)?")
_URL_QUERY = re.compile(r"(https?://[^\s\"'?]+)\?[^\s\"']*")


def _body_excerpt(response: httpx.Response, limit: int = 300) -> str:
    """A short, scrubbed excerpt of an error body: error shapes are undocumented (§11), and the text
    is what tells an operator which field was rejected. Tokens and URL queries are removed."""
    try:
        text = response.text
    except (UnicodeDecodeError, httpx.ResponseNotRead):
        return ""
    text = _URL_QUERY.sub(r"\1?…", _JWT_LIKE.sub("<token>", " ".join(text.split())))
    return text[:limit] + ("…" if len(text) > limit else "")


class _Ambiguous(Exception):
    """Internal: a POST may or may not have been stored."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class TechcyteClient:
    """A client for the Techcyte API (``https://api.{host}/api/v3``).

    - **Token**: the task's ``jwt_token`` when given, else the client-credentials exchange
      (``POST /token``, Basic auth by default, ``auth_style="form"`` for the form-body variant). On a
      401 the token is fetched once more through the exchange (if credentials are configured) and
      the call repeated; a second 401 raises :class:`TechcyteAuthError`. Token lifetimes are
      undocumented (§11), so nothing is cached across clients.
    - Every call has a timeout (``timeout_s``). Connection errors, timeouts, 5xx and 429 are retried
      ``retries`` times with jittered exponential backoff (``Retry-After`` honoured up to 30 s), then
      :class:`TechcyteUnavailableError`; other 4xx → :class:`TechcyteRejectedError` (never retried).
    - The results POST is not idempotent (§7): see :meth:`post_results`.
    - Logs name method, path and status only: never the token, secret or presigned URLs.

    The API URL is checked by ``policy`` (:attr:`Purpose.TECHCYTE_API`). Not thread-safe.
    """

    def __init__(
        self,
        api_url: str,
        *,
        policy: OutboundPolicy,
        task_token: str | SecretStr | None = None,
        client_id: str | None = None,
        client_secret: str | SecretStr | None = None,
        auth_style: Literal["basic", "form"] = "basic",
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        ca_bundle: Path | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ValueError("retries and backoff_s must be >= 0 and timeout_s > 0")
        self.base_url = policy.check(api_url.strip().rstrip("/"), Purpose.TECHCYTE_API)
        self._task_token = SecretStr(task_token) if isinstance(task_token, str) else task_token
        self._client_id = client_id
        self._client_secret = SecretStr(client_secret) if isinstance(client_secret, str) else client_secret
        if self._task_token is None and not self.has_credentials:
            raise ValueError("TechcyteClient needs a task token or a client id and secret")
        self._token: SecretStr | None = self._task_token
        self.auth_style = auth_style
        self.retries = retries
        self.backoff_s = backoff_s
        timeout = httpx.Timeout(timeout_s)
        if transport is not None:
            self._http = httpx.Client(
                transport=transport,
                timeout=timeout,
                follow_redirects=False,
                trust_env=False,
                event_hooks={"request": [policy.request_hook(Purpose.TECHCYTE_API)]},
            )
        else:
            verify: ssl.SSLContext | bool = True
            if ca_bundle is not None:
                verify = ssl.create_default_context(cafile=str(ca_bundle))
            self._http = policy.client(Purpose.TECHCYTE_API, verify=verify, timeout=timeout)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        policy: OutboundPolicy,
        task_token: str | SecretStr | None = None,
        client_id: str | None = None,
        client_secret: str | SecretStr | None = None,
        **kwargs: Any,
    ) -> TechcyteClient:
        """``SLIDEBRIDGE_TECHCYTE_API_URL``/``_CLIENT_ID``/``_CLIENT_SECRET`` and the HTTP timeout;
        explicit ``client_id``/``client_secret`` (e.g. read from Secrets Manager) win."""
        return cls(
            settings.techcyte_api_url,
            policy=policy,
            task_token=task_token,
            client_id=client_id or settings.techcyte_client_id,
            client_secret=client_secret or settings.techcyte_client_secret,
            timeout_s=kwargs.pop("timeout_s", settings.http_timeout_s),
            ca_bundle=kwargs.pop("ca_bundle", settings.ca_bundle),
            **kwargs,
        )

    @property
    def has_credentials(self) -> bool:
        return bool(self._client_id) and self._client_secret is not None

    def __repr__(self) -> str:
        return f"TechcyteClient({self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------------------------

    @staticmethod
    def _raise_for_status(response: httpx.Response, method: str, path: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        where = f"Techcyte {method} {path}: {status}"
        excerpt = _body_excerpt(response)
        detail = f" ({excerpt})" if excerpt else ""
        if status in (401, 403):
            raise TechcyteAuthError(f"{where} (token refused){detail}", status=status, path=path)
        if retryable_status(status):
            raise TechcyteUnavailableError(f"{where}{detail}", status=status, path=path)
        raise TechcyteRejectedError(f"{where}{detail}", status=status, path=path)

    def fetch_token(self) -> SecretStr:
        """The client-credentials exchange (§4); the token is kept for later calls and returned."""
        if not self.has_credentials or self._client_secret is None or self._client_id is None:
            raise TechcyteAuthError("Techcyte token: no API client id/secret configured", path="/token")
        secret = self._client_secret.get_secret_value()
        data = {"grant_type": "client_credentials"}
        auth: httpx.BasicAuth | None = None
        if self.auth_style == "basic":
            auth = httpx.BasicAuth(self._client_id, secret)
        else:
            data |= {"client_id": self._client_id, "client_secret": secret}
        response = self._send("POST", "/token", data=data, auth=auth)
        if response.status_code in (400, 401, 403):
            raise TechcyteAuthError(
                f"Techcyte POST /token: {response.status_code} (client credentials refused)",
                status=response.status_code,
                path="/token",
            )
        self._raise_for_status(response, "POST", "/token")
        try:
            token = response.json().get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise TechcyteError("Techcyte POST /token: no access_token in the answer", path="/token")
        self._token = SecretStr(token)
        return self._token

    def _auth_headers(self) -> dict[str, str]:
        token = self._token if self._token is not None else self.fetch_token()
        return {"Authorization": f"Bearer {token.get_secret_value()}", "Accept": "application/json"}

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried on connection errors, timeouts, 5xx and 429 (safe methods only:
        the results POST has its own loop). The body is read."""
        attempts = self.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self._http.request(method, self.base_url + path, **kwargs)
            except httpx.TransportError as exc:
                logger.warning(
                    "Techcyte %s %s: %s (attempt %d/%d)", method, path, type(exc).__name__, attempt + 1, attempts
                )
                if last:
                    raise TechcyteUnavailableError(
                        f"Techcyte {method} {path}: {type(exc).__name__} after {attempts} attempts", path=path
                    ) from None
                backoff_sleep(self.backoff_s, attempt)
                continue
            if retryable_status(response.status_code):
                logger.warning(
                    "Techcyte %s %s: %d (attempt %d/%d)", method, path, response.status_code, attempt + 1, attempts
                )
                if last:
                    raise TechcyteUnavailableError(
                        f"Techcyte {method} {path}: {response.status_code} after {attempts} attempts",
                        status=response.status_code,
                        path=path,
                    )
                backoff_sleep(self.backoff_s, attempt, response)
                continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _authed(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """:meth:`_send` with the bearer token; on 401 a fresh token once, then the call again."""
        response = self._send(method, path, headers=self._auth_headers(), **kwargs)
        if response.status_code == 401 and self.has_credentials:
            logger.info("Techcyte %s %s: 401, fetching a new token once", method, path)
            self.fetch_token()
            response = self._send(method, path, headers=self._auth_headers(), **kwargs)
        self._raise_for_status(response, method, path)
        return response

    @staticmethod
    def _task_path(task_id: str) -> str:
        return quote(task_id.strip(), safe="")

    # --- calls -------------------------------------------------------------------------------

    def get_case_evaluations(self, task_id: str) -> list[CaseEvaluation]:
        """``GET /external/case_evaluations/{task_id}``: EVERY evaluation on the task's case (§6)."""
        path = f"/external/case_evaluations/{self._task_path(task_id)}"
        response = self._authed("GET", path)
        try:
            data = response.json()
        except ValueError:
            raise TechcyteError(f"Techcyte GET {path}: the answer is not JSON", path=path) from None
        if not isinstance(data, list):
            raise TechcyteError(f"Techcyte GET {path}: expected a list of evaluations", path=path)
        try:
            return [CaseEvaluation.model_validate(item) for item in data]
        except ValidationError as exc:
            raise TechcyteError(
                f"Techcyte GET {path}: unexpected evaluation shape ({describe_validation_error(exc)})", path=path
            ) from None

    def find_posted(self, task_id: str, run_id: str) -> list[CaseEvaluation]:
        """Our run's evaluations on this task (matched on the decoded task number and the run
        marker in ``details.report``): non-empty means the results POST went through."""
        number = task_number(task_id)
        return [
            evaluation
            for evaluation in self.get_case_evaluations(task_id)
            if evaluation.report.get(RUN_MARKER_KEY) == run_id and (number is None or evaluation.task_id == str(number))
        ]

    def post_results(self, task_id: str, payload: ResultsPayload) -> None:
        """``POST /external/results/{task_id}`` (201). This completes the scans and is NOT idempotent:
        posting twice appends a second evaluation the lab sees (§7).

        A failure before the request was sent (connect error, pool timeout), 429 and 401 (one token
        refresh) are retried. After an ambiguous failure (timeout or connection loss after sending,
        5xx) the case evaluations are checked for the payload's run marker (``results.slidebridge_run``,
        see :meth:`ResultsPayload.run_id`): found → done; not found → sent again. Without a marker, or
        when the check itself fails, :class:`TechcyteOutcomeUnknownError` is raised instead of risking
        a duplicate. A 4xx raises :class:`TechcyteRejectedError` (all-or-nothing: nothing was stored).
        """
        path = f"/external/results/{self._task_path(task_id)}"
        body = payload.to_wire()
        run_id = payload.run_id()
        attempts = self.retries + 1
        refreshed = False
        attempt = 0
        while True:
            last = attempt >= attempts - 1
            try:
                response = self._http.post(self.base_url + path, json=body, headers=self._auth_headers())
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                outcome: str | httpx.Response | _Ambiguous = type(exc).__name__  # never reached the server
            except httpx.TransportError as exc:
                outcome = _Ambiguous(type(exc).__name__)
            else:
                if response.status_code == 401 and self.has_credentials and not refreshed:
                    logger.info("Techcyte POST %s: 401, fetching a new token once", path)
                    refreshed = True
                    self.fetch_token()
                    continue
                if response.status_code >= 500:
                    outcome = _Ambiguous(str(response.status_code), response.status_code)
                elif response.status_code == 429:
                    outcome = response
                else:
                    self._raise_for_status(response, "POST", path)
                    logger.info("Techcyte POST %s: %d", path, response.status_code)
                    return
            reason = (
                outcome.reason
                if isinstance(outcome, _Ambiguous)
                else (outcome if isinstance(outcome, str) else str(outcome.status_code))
            )
            logger.warning("Techcyte POST %s: %s (attempt %d/%d)", path, reason, attempt + 1, attempts)
            if isinstance(outcome, _Ambiguous):
                if run_id is None:
                    raise TechcyteOutcomeUnknownError(
                        f"Techcyte POST {path}: {reason}; outcome unknown and the payload has no run marker",
                        status=outcome.status,
                        path=path,
                    )
                try:
                    found = self.find_posted(task_id, run_id)
                except TechcyteError as exc:
                    raise TechcyteOutcomeUnknownError(
                        f"Techcyte POST {path}: {reason}; outcome unknown (checking case evaluations failed: "
                        f"{exc.message})",
                        status=outcome.status,
                        path=path,
                    ) from None
                if found:
                    logger.info("Techcyte POST %s: stored by an unanswered attempt, not sent again", path)
                    return
            if last:
                raise TechcyteUnavailableError(
                    f"Techcyte POST {path}: {reason} after {attempts} attempts (nothing stored)",
                    status=outcome.status_code if isinstance(outcome, httpx.Response) else None,
                    path=path,
                )
            backoff_sleep(self.backoff_s, attempt, outcome if isinstance(outcome, httpx.Response) else None)
            attempt += 1

    def patch_triage(self, task_id: str, *, category: str | None = None, score: float | None = None) -> None:
        """``PATCH /external/case/{task_id}`` (204): set the case's triage category and/or score.
        Idempotent, so retried like a GET. Omitted fields stay unchanged."""
        body: dict[str, Any] = {}
        if category is not None:
            body["triage_category"] = category
        if score is not None:
            body["triage_score"] = score
        if not body:
            return  # {} is a no-op on the server (§6): save the call
        self._authed("PATCH", f"/external/case/{self._task_path(task_id)}", json=body)


def scan_results_by_id(payload: ResultsPayload) -> Mapping[str, ScanResult]:
    """The payload's scanResults keyed by scan id."""
    return {scan.scanId: scan for scan in payload.scanResults}


def payload_for(scans: Sequence[ScanResult]) -> ResultsPayload:
    """The one body of a task, from every scan's result (in the order given)."""
    return ResultsPayload(scanResults=list(scans))
