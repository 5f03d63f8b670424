"""The Platform API's OpenAPI 3.1 document (``GET /api/v1/openapi.json``).

Schemas come from the very pydantic models that validate requests and shape responses
(``slidebridge.platform``), so the document cannot drift from what the routes accept and send.
Operation ids, paths, parameters and status codes follow the Aignostics Platform API v1.4.0
(vendors/PLATFORM_API.md §2), so a client generated from this document has the same method names
as ``aignx.codegen``. Hand-written here (FastAPI would generate it, but the API is a Powertools
resolver behind API Gateway): the list of operations with their parameters and responses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema
from pydantic_core import core_schema

from slidebridge.applications import SEMVER_PATTERN
from slidebridge.listing import (
    APPLICATION_SORT_FIELDS,
    DEFAULT_PAGE_SIZE,
    ITEM_SORT_FIELDS,
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
    RUN_SORT_FIELDS,
)
from slidebridge.platform import (
    ApplicationReadResponse,
    ApplicationReadShortResponse,
    CustomMetadataUpdateRequest,
    CustomMetadataUpdateResponse,
    ItemResultReadResponse,
    MeReadResponse,
    RunCreationRequest,
    RunCreationResponse,
    RunReadResponse,
    VersionReadResponse,
)
from slidebridge.runs import ItemState, ItemTerminationReason

OPENAPI_PATH = "/api/v1/openapi.json"
API_VERSION = "1.4.0"


class ValidationError(BaseModel):
    """One fault of a request, FastAPI's shape."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int]
    msg: str
    type: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class HTTPValidationError(BaseModel):
    """The body of every 422."""

    detail: list[ValidationError]


class ErrorResponse(BaseModel):
    """The body of every other error."""

    detail: str


@dataclass(frozen=True)
class Param:
    name: str
    where: Literal["path", "query"]
    schema: dict[str, Any]
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class Body:
    model: type[BaseModel]
    many: bool = False  # a bare JSON array of ``model``


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    success: int
    body: Body | None  # the success response's body; None: any JSON (the API sends null)
    errors: tuple[int, ...]
    params: tuple[Param, ...] = ()
    request: type[BaseModel] | None = None
    description: str = ""
    extra_responses: dict[int, str] = field(default_factory=dict)
    public: bool = False


_UUID = {"type": "string", "format": "uuid"}
_STRING = {"type": "string"}
_RUN_ID = Param("run_id", "path", _UUID, "Run id, returned by POST /runs", required=True)
_EXTERNAL_ID = Param(
    "external_id", "path", _STRING, "The item's external_id; percent-encode it (a / is %2F)", required=True
)
_PAGE = Param("page", "query", {"type": "integer", "minimum": 1, "default": 1})
_PAGE_SIZE_SCHEMA = {
    "type": "integer",
    "minimum": MIN_PAGE_SIZE,
    "maximum": MAX_PAGE_SIZE,
    "default": DEFAULT_PAGE_SIZE,
}
_PAGE_SIZE = Param("page_size", "query", _PAGE_SIZE_SCHEMA, "also accepted as page-size")
_CUSTOM_METADATA_FILTER = Param(
    "custom_metadata",
    "query",
    {"type": "string", "maxLength": 1000},
    'SQL/JSON path over the custom metadata, e.g. $.study ? (@ == "s1"); matches when it yields anything',
)


def _sort(fields: tuple[str, ...]) -> Param:
    return Param(
        "sort",
        "query",
        {"type": "array", "items": {"type": "string"}},
        f"Repeatable. Prefix - for descending, + or nothing for ascending. Fields: {', '.join(fields)}",
    )


def _enum(enum: type[Any]) -> dict[str, Any]:
    return TypeAdapter(enum).json_schema()


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "get",
        "/api/v1/applications",
        "list_applications_v1_applications_get",
        "List available applications",
        200,
        Body(ApplicationReadShortResponse, many=True),
        (401, 422),
        (
            _PAGE,
            Param("page-size", "query", _PAGE_SIZE_SCHEMA, "also accepted as page_size"),
            _sort(APPLICATION_SORT_FIELDS),
        ),
    ),
    Operation(
        "get",
        "/api/v1/applications/{application_id}",
        "read_application_by_id_v1_applications__application_id__get",
        "Read application by id",
        200,
        Body(ApplicationReadResponse),
        (401, 404, 422),
        (Param("application_id", "path", _STRING, required=True),),
    ),
    Operation(
        "get",
        "/api/v1/applications/{application_id}/versions/{version}",
        "application_version_details_v1_applications__application_id__versions__version__get",
        "Application version details",
        200,
        Body(VersionReadResponse),
        (401, 404, 422),
        (
            Param("application_id", "path", _STRING, required=True),
            Param("version", "path", {"type": "string", "pattern": SEMVER_PATTERN}, "SemVer 2.0", required=True),
        ),
        description="Input and output artifact definitions; POST /runs enforces each input's metadata_schema.",
    ),
    Operation(
        "get",
        "/api/v1/runs",
        "list_runs_v1_runs_get",
        "List runs",
        200,
        Body(RunReadResponse, many=True),
        (401, 404, 422),
        (
            Param("application_id", "query", _STRING),
            Param("application_version", "query", _STRING, "matches the run's version_number"),
            Param("external_id", "query", _STRING, "runs that have an item with this external_id"),
            _CUSTOM_METADATA_FILTER,
            _PAGE,
            _PAGE_SIZE,
            Param("for_organization", "query", _STRING, "must be the caller's organisation (else 404)"),
            Param("submitted_by", "query", _STRING, "a user id, or me"),
            _sort(RUN_SORT_FIELDS),
        ),
        description="Runs of the caller's organisation, newest first unless sorted.",
    ),
    Operation(
        "post",
        "/api/v1/runs",
        "create_run_v1_runs_post",
        "Initiate run",
        201,
        Body(RunCreationResponse),
        (400, 401, 404, 422),
        request=RunCreationRequest,
        description=(
            "422: shape errors, and input metadata failing the version's metadata_schema (detail names the item "
            "and field). 400: duplicate external_id, unknown input artifact, URL outside the download allowlist. "
            "404: unknown application or version. A run past scheduling.deadline is cancelled by the system."
        ),
    ),
    Operation(
        "get",
        "/api/v1/runs/{run_id}",
        "get_run_v1_runs__run_id__get",
        "Get run details",
        200,
        Body(RunReadResponse),
        (401, 404, 422),
        (_RUN_ID,),
    ),
    Operation(
        "post",
        "/api/v1/runs/{run_id}/cancel",
        "cancel_run_v1_runs__run_id__cancel_post",
        "Cancel run",
        202,
        None,
        (401, 404, 409, 422),
        (_RUN_ID,),
        description="409 once the run has terminated (cancelled or finished). Finished items keep their artifacts.",
    ),
    Operation(
        "get",
        "/api/v1/runs/{run_id}/items",
        "list_run_items_v1_runs__run_id__items_get",
        "List run items",
        200,
        Body(ItemResultReadResponse, many=True),
        (401, 404, 422),
        (
            _RUN_ID,
            Param("item_id__in", "query", {"type": "array", "items": _UUID}),
            Param("external_id__in", "query", {"type": "array", "items": _STRING}),
            Param("state", "query", _enum(ItemState)),
            Param("termination_reason", "query", _enum(ItemTerminationReason)),
            _CUSTOM_METADATA_FILTER,
            _PAGE,
            _PAGE_SIZE,
            _sort(ITEM_SORT_FIELDS),
        ),
    ),
    Operation(
        "get",
        "/api/v1/runs/{run_id}/items/{external_id}",
        "get_item_by_run_v1_runs__run_id__items__external_id__get",
        "Get item by external id",
        200,
        Body(ItemResultReadResponse),
        (401, 404, 422),
        (_RUN_ID, _EXTERNAL_ID),
    ),
    Operation(
        "get",
        "/api/v1/runs/{run_id}/artifacts/{artifact_id}/file",
        "get_artifact_url_v1_runs__run_id__artifacts__artifact_id__file_get",
        "Get artifact file",
        307,
        None,
        (401, 404, 410, 422),
        (_RUN_ID, Param("artifact_id", "path", _UUID, "output_artifact_id of the artifact", required=True)),
        description="Redirects (Location) to a short-lived presigned URL of the file. 410 once deleted.",
    ),
    Operation(
        "delete",
        "/api/v1/runs/{run_id}/artifacts",
        "delete_run_items_v1_runs__run_id__artifacts_delete",
        "Delete run artifacts",
        200,
        None,
        (401, 404, 409, 422),
        (_RUN_ID,),
        description="Only once the run has terminated (else 409); the artifacts then show DELETED_BY_USER.",
    ),
    Operation(
        "put",
        "/api/v1/runs/{run_id}/custom-metadata",
        "put_run_custom_metadata_v1_runs__run_id__custom_metadata_put",
        "Put run custom metadata",
        200,
        Body(CustomMetadataUpdateResponse),
        (401, 404, 412, 422),
        (_RUN_ID,),
        request=CustomMetadataUpdateRequest,
        description="Replaces the metadata; a non-null custom_metadata_checksum must match the stored one (else 412).",
    ),
    Operation(
        "put",
        "/api/v1/runs/{run_id}/items/{external_id}/custom-metadata",
        "put_item_custom_metadata_by_run_v1_runs__run_id__items__external_id__custom_metadata_put",
        "Put item custom metadata",
        200,
        Body(CustomMetadataUpdateResponse),
        (401, 404, 412, 422),
        (_RUN_ID, _EXTERNAL_ID),
        request=CustomMetadataUpdateRequest,
    ),
    Operation(
        "get",
        "/api/v1/me",
        "get_me_v1_me_get",
        "Get current user",
        200,
        Body(MeReadResponse),
        (401,),
    ),
    Operation(
        "get",
        OPENAPI_PATH,
        "openapi_v1_openapi_json_get",
        "This document",
        200,
        None,
        (),
        public=True,
    ),
)

_ERROR_TEXT = {
    400: "Bad Request",
    401: "Unauthorized - missing, unknown or revoked API token",
    404: "Not Found (or not visible to the caller's organisation)",
    409: "Conflict",
    410: "Gone - the artifact was deleted",
    412: "Precondition Failed - custom_metadata_checksum mismatch",
    422: "Validation Error",
}
_SUCCESS_TEXT = {200: "Successful Response", 201: "Created", 202: "Accepted", 307: "Temporary Redirect"}


class _ResponsesSendEveryField(GenerateJsonSchema):
    """In responses every field is sent, defaults included (e.g. RunStatistics' counters): mark them required."""

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        if self.mode == "serialization":
            return not field.get("serialization_exclude")
        return super().field_is_required(field, total)


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _models() -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for op in OPERATIONS:
        if op.request is not None:
            models.append((op.request, "validation"))
        if op.body is not None:
            models.append((op.body.model, "serialization"))
    # Error bodies in "validation" mode: only their required keys are promised (input, ctx may be absent).
    models += [(HTTPValidationError, "validation"), (ErrorResponse, "validation")]
    return list(dict.fromkeys(models))


def _parameter(param: Param) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": param.name, "in": param.where, "required": param.required, "schema": param.schema}
    if param.description:
        spec["description"] = param.description
    if param.schema.get("type") == "array":
        spec["explode"] = True  # repeated: sort=a&sort=-b
    return spec


def _operation(op: Operation, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    success: dict[str, Any] = {"description": _SUCCESS_TEXT.get(op.success, "Successful Response")}
    if op.body is not None:
        ref = refs[(op.body.model, "serialization")]
        success["content"] = _json({"type": "array", "items": ref} if op.body.many else ref)
    elif op.success == 307:
        success["headers"] = {"Location": {"schema": {"type": "string", "format": "uri"}, "required": True}}
    elif op.public:
        success["content"] = _json({"type": "object"})
    else:
        success["content"] = _json({})  # any JSON; the API sends null
    responses: dict[str, Any] = {str(op.success): success}
    for status in op.errors:
        model = HTTPValidationError if status == 422 else ErrorResponse
        responses[str(status)] = {
            "description": _ERROR_TEXT[status],
            "content": _json(refs[(model, "validation")]),
        }
    spec: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": ["Public"],
        "responses": responses,
    }
    if op.description:
        spec["description"] = op.description
    if op.params:
        spec["parameters"] = [_parameter(p) for p in op.params]
    if op.request is not None:
        spec["requestBody"] = {"required": True, "content": _json(refs[(op.request, "validation")])}
    if op.public:
        spec["security"] = []
    return spec


@lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    """The whole document (built once per process; treat it as read-only)."""
    refs, definitions = models_json_schema(
        _models(), ref_template="#/components/schemas/{model}", schema_generator=_ResponsesSendEveryField
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "slidebridge Platform API",
            "version": API_VERSION,
            "description": (
                "The Aignostics Platform API v1 (v1.4.0 surface) as served by slidebridge: the official "
                "generated client aignx.codegen works against it unchanged. Authenticate with "
                "Authorization: Bearer <API token>."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {"APIToken": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"APIToken": []}],
        "tags": [{"name": "Public"}],
    }
