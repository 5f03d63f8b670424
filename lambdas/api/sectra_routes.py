"""Sectra IA-API routes: registration, info, invocations, image notifications (vendors/SECTRA.md §2).

Every answer carries our X-Sectra-ApiVersion / X-Sectra-SoftwareVersion; a wrong key gets 404 and
touches nothing.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEvent

from lambdas.api.deps import sectra_service, settings, webhook_keys
from lambdas.api.http import UnknownWebhookKeyError, parse_body

if TYPE_CHECKING:
    from slidebridge.webhook_keys import Vendor

# The Sectra models and client (slidebridge.vendors.sectra) load with the first Sectra request, not
# with the handler: the other front doors never need them.

router = Router()


def sectra_headers() -> dict[str, str]:
    from slidebridge.vendors.sectra import IA_API_VERSION, SOFTWARE_VERSION  # noqa: PLC0415

    return {"X-Sectra-ApiVersion": IA_API_VERSION, "X-Sectra-SoftwareVersion": SOFTWARE_VERSION}


def _json(payload: Any) -> Response[str]:

    return Response(
        status_code=200, content_type="application/json", body=json.dumps(payload), headers=sectra_headers()
    )


def require_key(vendor: Vendor, key: str) -> None:
    if not webhook_keys().matches(vendor, key):
        raise UnknownWebhookKeyError("not found")


def webhook_url(key: str) -> str:
    """The registered URL, from configuration; else from the request (local stack, first set-up)."""
    base = settings().public_url
    if base is None:
        event = router.current_event
        host = event.headers.get("Host") or event.headers.get("host") or "localhost"
        # The REST resolver's events are API Gateway proxy events, which carry the stage.
        stage = cast(APIGatewayProxyEvent, event).request_context.stage
        base = f"http://{host}" if stage == "local" else f"https://{host}/{stage}"
    return f"{base.rstrip('/')}/hooks/sectra/{key}"


@router.get("/hooks/sectra/<key>")
def get_registration(key: str) -> Response[str]:
    require_key("sectra", key)
    return _json(sectra_service().registration(webhook_url(key)))


@router.get("/hooks/sectra/<key>/info")
def get_info(key: str) -> Response[str]:
    from slidebridge.vendors.sectra import IA_API_VERSION, SOFTWARE_VERSION  # noqa: PLC0415

    require_key("sectra", key)
    return _json({"apiVersion": IA_API_VERSION, "softwareVersion": SOFTWARE_VERSION})


@router.post("/hooks/sectra/<key>")
def post_invocation(key: str) -> Response[str]:
    from slidebridge.vendors.sectra import Invocation  # noqa: PLC0415

    require_key("sectra", key)
    invocation = parse_body(router.current_event, Invocation)
    service = sectra_service()
    match invocation.action:
        case "create":
            return _json(service.create(invocation))
        case "cancel":
            return _json(service.cancel(invocation))
        case "delete":
            return _json(service.delete(invocation))
        case "modify":
            return _json(service.modify(invocation))


@router.post("/hooks/sectra/<key>/imagenotification")
def post_image_notification(key: str) -> Response[str]:
    from slidebridge.vendors.sectra import ImageNotification  # noqa: PLC0415

    require_key("sectra", key)
    notification = parse_body(router.current_event, ImageNotification)
    return _json(sectra_service().image_notification(notification))
