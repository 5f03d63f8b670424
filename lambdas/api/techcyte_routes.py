"""Techcyte API-bridge webhook (vendors/TECHCYTE.md §2–§3): one POST per AI request.

Techcyte sends no signature (§11), so the path key is the credential: a wrong key gets 404 and
touches nothing. Errors answer ``{"detail": "<what is wrong>"}`` (the shape of Techcyte's example):
400 for a body that is not JSON, 422 for a missing or malformed field, 403 for a download URL
outside the allowlist; nothing is stored for any of them.
"""

from __future__ import annotations

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router

from lambdas.api.deps import techcyte_service, webhook_keys
from lambdas.api.http import UnknownWebhookKeyError, json_response, parse_body

router = Router()


@router.post("/hooks/techcyte/<key>")
def post_webhook(key: str) -> Response[str]:
    # Loaded with the first Techcyte request, not with the handler (the other front doors never need it).
    from slidebridge.vendors.techcyte import WebhookPayload  # noqa: PLC0415

    if not webhook_keys().matches("techcyte", key):
        raise UnknownWebhookKeyError("not found")
    payload = parse_body(router.current_event, WebhookPayload)
    return json_response(200, techcyte_service().accept(payload))
