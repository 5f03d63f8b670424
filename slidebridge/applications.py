"""The applications this deployment serves, with their versions and artifact definitions.

A version's ``metadata_schema`` is a real JSON Schema: the SDK validates against it before
sending, and ``POST /runs`` enforces it again (PLATFORM_API.md §3).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from slidebridge.errors import NotFoundError

# SemVer 2.0 (semver.org's regex), as the 1.6.0 client checks version numbers; and the client's media
# type pattern for artifact definitions (PLATFORM_API.md §8).
SEMVER_PATTERN = (
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
MIME_TYPE_PATTERN = r"^\w+\/\w+[-+.|\w+]+\w+$"
_SEMVER = re.compile(SEMVER_PATTERN)


def is_semver(number: str) -> bool:
    return _SEMVER.fullmatch(number) is not None


class InputArtifactDefinition(BaseModel):
    name: str
    mime_type: str = Field(pattern=MIME_TYPE_PATTERN)
    metadata_schema: dict[str, Any]


class OutputArtifactDefinition(BaseModel):
    name: str
    mime_type: str = Field(pattern=MIME_TYPE_PATTERN)
    metadata_schema: dict[str, Any]
    scope: Literal["ITEM", "GLOBAL"] = "ITEM"
    visibility: Literal["INTERNAL", "EXTERNAL"] = "EXTERNAL"


class ApplicationVersion(BaseModel):
    # Checked here, so that a registered version the client would reject fails at start, not per request.
    version_number: str = Field(pattern=SEMVER_PATTERN)
    released_at: datetime
    changelog: str = ""
    input_artifacts: list[InputArtifactDefinition]
    output_artifacts: list[OutputArtifactDefinition]


class Application(BaseModel):
    application_id: str
    name: str
    description: str
    regulatory_classes: list[str]
    versions: list[ApplicationVersion]

    def version(self, number: str | None) -> ApplicationVersion:
        """The named version, or the latest by SemVer (as the SDK resolves "latest")."""
        if number is None:
            return max(self.versions, key=lambda v: semver_key(v.version_number))
        for candidate in self.versions:
            if candidate.version_number == number:
                return candidate
        raise NotFoundError(f"application {self.application_id} has no version {number}")


def semver_key(number: str) -> tuple[tuple[int, int, int], int, tuple[tuple[int, int | str], ...]]:
    """SemVer 2.0 precedence: a pre-release sorts before its release; build metadata is ignored.

    Pre-release identifiers compare numerically when numeric, else as text, and numeric ones sort
    first (semver.org §11), which the SDK's ``semver`` package also follows. Raises ValueError for a
    number that is not SemVer.
    """
    match = _SEMVER.fullmatch(number)
    if match is None:
        raise ValueError(f"not a SemVer 2.0 version number: {number!r}")
    core = (int(match[1]), int(match[2]), int(match[3]))
    if match[4] is None:
        return core, 1, ()
    identifiers = tuple((0, int(part)) if part.isdigit() else (1, part) for part in match[4].split("."))
    return core, 0, identifiers


WSI_METADATA_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "Whole-slide image metadata",
    "type": "object",
    "required": ["checksum_base64_crc32c"],
    "properties": {
        "checksum_base64_crc32c": {
            "type": "string",
            "description": "base64 of the big-endian CRC-32C of the whole file",
            "pattern": "^[A-Za-z0-9+/]{6}==$",
        },
        "width_px": {"type": "integer", "minimum": 1},
        "height_px": {"type": "integer", "minimum": 1},
        "resolution_mpp": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
        # The SDK writes media_type, the API docs media-type: accept both.
        "media_type": {"type": "string"},
        "media-type": {"type": "string"},
    },
    "additionalProperties": True,
}


def _artifact_schema(description: str) -> dict[str, Any]:
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": description,
        "type": "object",
        "required": ["media_type", "checksum_base64_crc32c"],
        "properties": {
            "media_type": {"type": "string"},
            "size_bytes": {"type": "integer"},
            "checksum_base64_crc32c": {"type": "string"},
        },
    }


HE_TISSUE_OUTPUTS = [
    OutputArtifactDefinition(
        name="tissue:geojson",
        mime_type="application/geo+json",
        metadata_schema=_artifact_schema("Class regions as polygons in level-0 pixels"),
    ),
    OutputArtifactDefinition(
        name="tiles:csv",
        mime_type="text/csv",
        metadata_schema=_artifact_schema("Per-tile class probabilities"),
    ),
    OutputArtifactDefinition(
        name="heatmap:png",
        mime_type="image/png",
        metadata_schema=_artifact_schema("Slide thumbnail with the class overlay"),
    ),
    OutputArtifactDefinition(
        name="summary:json",
        mime_type="application/json",
        metadata_schema=_artifact_schema("Summary figures: tissue area, class fractions"),
    ),
]

APPLICATIONS: dict[str, Application] = {
    "he-tissue": Application(
        application_id="he-tissue",
        name="H&E tissue",
        description=(
            "Tissue detection and H&E colour-deconvolution tile classification: background, tissue, cellular."
        ),
        regulatory_classes=["RUO"],
        versions=[
            ApplicationVersion(
                version_number="1.0.0",
                released_at=datetime(2026, 11, 1, tzinfo=UTC),
                changelog="First release.",
                input_artifacts=[
                    InputArtifactDefinition(
                        name="whole_slide_image", mime_type="image/tiff", metadata_schema=WSI_METADATA_SCHEMA
                    )
                ],
                output_artifacts=HE_TISSUE_OUTPUTS,
            )
        ],
    )
}


def get_application(application_id: str) -> Application:
    try:
        return APPLICATIONS[application_id]
    except KeyError:
        raise NotFoundError(f"application {application_id} not found") from None
