"""Platform API v1 routes (Aignostics shapes): parse, call PlatformService, return."""

from __future__ import annotations

from urllib.parse import unquote

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router

from lambdas.api.deps import platform_service, run_store
from lambdas.api.http import AuthenticationError, json_response, parse_body, require_uuid
from slidebridge.platform import (
    RunCreationRequest,
    RunCreationResponse,
    item_view,
    list_applications,
    run_view,
)
from slidebridge.store import Principal

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


@router.get("/api/v1/applications")
def get_applications() -> Response[str]:
    principal()
    return json_response(200, list_applications())


@router.post("/api/v1/runs")
def post_run() -> Response[str]:
    caller = principal()
    request = parse_body(router.current_event, RunCreationRequest)
    run = platform_service().create_run(caller, request)
    return json_response(201, RunCreationResponse(run_id=run.run_id))


@router.get("/api/v1/runs/<run_id>")
def get_run(run_id: str) -> Response[str]:
    caller = principal()
    run = platform_service().get_visible_run(caller, require_uuid("run_id", run_id))
    return json_response(200, run_view(run))


@router.get("/api/v1/runs/<run_id>/items")
def get_run_items(run_id: str) -> Response[str]:
    caller = principal()
    service = platform_service()
    run = service.get_visible_run(caller, require_uuid("run_id", run_id))
    return json_response(200, [item_view(item) for item in service.store.list_items(run.run_id)])


@router.get("/api/v1/runs/<run_id>/items/<external_id>")
def get_run_item(run_id: str, external_id: str) -> Response[str]:
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
