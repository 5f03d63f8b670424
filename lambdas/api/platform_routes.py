"""Platform API v1 routes (Aignostics shapes): parse, call PlatformService, return."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import unquote

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router

from lambdas.api.deps import platform_service, run_store
from lambdas.api.http import (
    AuthenticationError,
    RequestValidationError,
    json_response,
    parse_body,
    require_uuid,
)

if TYPE_CHECKING:
    from slidebridge.store import Principal

# The Platform models and service (slidebridge.platform, with jsonschema and the OpenAPI builder) load
# with the first Platform request, not with the handler: the vendor webhooks never need them.

router = Router()


def principal() -> Principal:
    """The caller behind ``Authorization: Bearer <token>``; 401 for a missing or unknown token."""
    header = router.current_event.headers.get("Authorization") or router.current_event.headers.get("authorization")
    if not header or not header.lower().startswith("bearer "):
        raise AuthenticationError("missing bearer token")
    found = run_store().authenticate(header[7:].strip())
    if found is None:
        raise AuthenticationError("invalid or revoked token")
    return found


def query_params() -> dict[str, list[str]]:
    """Every query parameter with all its values (``sort=a&sort=-b``), already URL-decoded by the gateway."""
    event = router.current_event
    params = {name: list(values) for name, values in (event.multi_value_query_string_parameters or {}).items()}
    # Events without the multi-value map (hand-written ones) still carry the single-value map.
    for name, value in (event.query_string_parameters or {}).items():
        params.setdefault(name, [value])
    return params


def require_semver(name: str, value: str) -> str:
    from slidebridge.applications import is_semver  # noqa: PLC0415

    if not is_semver(value):
        raise RequestValidationError(
            [
                {
                    "loc": ["path", name],
                    "msg": "Input should be a SemVer 2.0 version number, e.g. 1.0.0",
                    "type": "string_pattern_mismatch",
                    "input": value,
                }
            ]
        )
    return value


# slidebridge.openapi.OPENAPI_PATH, written out so that the route table needs no import of the
# document builder (test_platform_operations checks that the document and the routes agree).
@router.get("/api/v1/openapi.json")
def get_openapi() -> Response[str]:
    from slidebridge.openapi import openapi_document  # noqa: PLC0415

    # Public, as FastAPI serves it: the document describes the API and holds no data.
    return json_response(200, openapi_document())


@router.get("/api/v1/me")
def get_me() -> Response[str]:
    from slidebridge.platform import me_view  # noqa: PLC0415

    return json_response(200, me_view(principal()))


@router.get("/api/v1/applications")
def get_applications() -> Response[str]:
    from slidebridge.platform import application_list_query, list_applications  # noqa: PLC0415

    principal()
    return json_response(200, list_applications(application_list_query(query_params())))


@router.get("/api/v1/applications/<application_id>")
def get_application(application_id: str) -> Response[str]:
    from slidebridge.platform import read_application  # noqa: PLC0415

    principal()
    return json_response(200, read_application(unquote(application_id)))


@router.get("/api/v1/applications/<application_id>/versions/<version>")
def get_application_version(application_id: str, version: str) -> Response[str]:
    from slidebridge.platform import read_version  # noqa: PLC0415

    principal()
    return json_response(200, read_version(unquote(application_id), require_semver("version", unquote(version))))


@router.get("/api/v1/runs")
def get_runs() -> Response[str]:
    from slidebridge.platform import RunListQuery, run_view  # noqa: PLC0415

    caller = principal()
    runs = platform_service().list_runs(caller, RunListQuery.from_params(query_params()))
    return json_response(200, [run_view(run) for run in runs])


@router.post("/api/v1/runs")
def post_run() -> Response[str]:
    from slidebridge.platform import RunCreationRequest, RunCreationResponse  # noqa: PLC0415

    caller = principal()
    request = parse_body(router.current_event, RunCreationRequest)
    run = platform_service().create_run(caller, request)
    return json_response(201, RunCreationResponse(run_id=run.run_id))


@router.get("/api/v1/runs/<run_id>")
def get_run(run_id: str) -> Response[str]:
    from slidebridge.platform import run_view  # noqa: PLC0415

    caller = principal()
    run = platform_service().get_visible_run(caller, require_uuid("run_id", run_id))
    return json_response(200, run_view(run))


@router.get("/api/v1/runs/<run_id>/items")
def get_run_items(run_id: str) -> Response[str]:
    from slidebridge.platform import ItemListQuery, item_view  # noqa: PLC0415

    caller = principal()
    run_id = require_uuid("run_id", run_id)
    items = platform_service().list_run_items(caller, run_id, ItemListQuery.from_params(query_params()))
    return json_response(200, [item_view(item) for item in items])


@router.get("/api/v1/runs/<run_id>/items/<external_id>")
def get_run_item(run_id: str, external_id: str) -> Response[str]:
    from slidebridge.platform import item_view  # noqa: PLC0415

    caller = principal()
    # The gateway keeps %2F (and %25) encoded so an external_id may hold slashes: decode exactly once.
    item = platform_service().get_item_by_external_id(caller, require_uuid("run_id", run_id), unquote(external_id))
    return json_response(200, item_view(item))


@router.get("/api/v1/runs/<run_id>/artifacts/<artifact_id>/file")
def get_artifact_file(run_id: str, artifact_id: str) -> Response[str]:
    caller = principal()
    url = platform_service().artifact_url(
        caller, require_uuid("run_id", run_id), require_uuid("artifact_id", artifact_id)
    )
    return Response(status_code=307, headers={"Location": url}, content_type="application/json", body="null")


@router.post("/api/v1/runs/<run_id>/cancel")
def post_cancel(run_id: str) -> Response[str]:
    caller = principal()
    platform_service().cancel(caller, require_uuid("run_id", run_id))
    return json_response(202, None)


@router.delete("/api/v1/runs/<run_id>/artifacts")
def delete_artifacts(run_id: str) -> Response[str]:
    caller = principal()
    platform_service().delete_artifacts(caller, require_uuid("run_id", run_id))
    return json_response(200, None)


@router.put("/api/v1/runs/<run_id>/custom-metadata")
def put_run_metadata(run_id: str) -> Response[str]:
    from slidebridge.platform import CustomMetadataUpdateRequest, CustomMetadataUpdateResponse  # noqa: PLC0415

    caller = principal()
    run_id = require_uuid("run_id", run_id)
    request = parse_body(router.current_event, CustomMetadataUpdateRequest)
    checksum = platform_service().put_run_custom_metadata(caller, run_id, request)
    return json_response(200, CustomMetadataUpdateResponse(custom_metadata_checksum=checksum))


@router.put("/api/v1/runs/<run_id>/items/<external_id>/custom-metadata")
def put_item_metadata(run_id: str, external_id: str) -> Response[str]:
    from slidebridge.platform import CustomMetadataUpdateRequest, CustomMetadataUpdateResponse  # noqa: PLC0415

    caller = principal()
    run_id = require_uuid("run_id", run_id)
    request = parse_body(router.current_event, CustomMetadataUpdateRequest)
    # Decoded exactly once, as for GET .../items/{external_id}.
    checksum = platform_service().put_item_custom_metadata(caller, run_id, unquote(external_id), request)
    return json_response(200, CustomMetadataUpdateResponse(custom_metadata_checksum=checksum))
