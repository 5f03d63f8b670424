"""The baseline of ``bench.webhook``: the two vendor webhooks as a plain FastAPI app.

The same routes as the ``api`` Lambda's vendor front doors, written the way FastAPI is usually
written: the body is a typed parameter (FastAPI parses the JSON and validates it with the same
pydantic models), the path key is checked by a dependency (before the body is validated, as ours
checks it first), and the same services (``lambdas.api.deps``) do the same domain calls. Errors
answer our shapes (``{"error": …}`` for Sectra, ``{"detail": …}`` for Techcyte) so that both apps can
be compared request by request; only the bodies of unreadable-JSON answers differ in wording.

Its module is imported as FastAPI apps are: the models its signatures name, at import.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lambdas.api import deps
from lambdas.api.http import UnknownWebhookKeyError
from slidebridge.errors import (
    SectraAuthError,
    SectraError,
    SectraNotFoundError,
    UrlNotAllowedError,
    ValidationFailedError,
)
from slidebridge.vendors.sectra import IA_API_VERSION, SOFTWARE_VERSION, Invocation
from slidebridge.vendors.techcyte import WebhookPayload
from slidebridge.vendors.techcyte_service import WebhookAccepted

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

SECTRA_HEADERS = {"X-Sectra-ApiVersion": IA_API_VERSION, "X-Sectra-SoftwareVersion": SOFTWARE_VERSION}


def _sectra_key(key: str) -> str:
    if not deps.webhook_keys().matches("sectra", key):
        raise UnknownWebhookKeyError("not found")
    return key


def _techcyte_key(key: str) -> str:
    if not deps.webhook_keys().matches("techcyte", key):
        raise UnknownWebhookKeyError("not found")
    return key


@app.post("/hooks/sectra/{key}")
def sectra_invocation(
    invocation: Invocation, response: Response, key: Annotated[str, Depends(_sectra_key)]
) -> Any:  # a dict, or a list for cancel (as the api handler answers)
    response.headers.update(SECTRA_HEADERS)
    service = deps.sectra_service()
    match invocation.action:
        case "create":
            return service.create(invocation)
        case "cancel":
            return service.cancel(invocation)
        case "delete":
            return service.delete(invocation)
        case "modify":
            return service.modify(invocation)


@app.post("/hooks/techcyte/{key}")
def techcyte_webhook(payload: WebhookPayload, key: Annotated[str, Depends(_techcyte_key)]) -> WebhookAccepted:
    return deps.techcyte_service().accept(payload)


# --- errors: the api handler's shapes ------------------------------------------------------------


def _error(request: Request, status: int, message: str) -> JSONResponse:
    if request.url.path.startswith("/hooks/sectra/"):
        return JSONResponse({"error": message}, status_code=status, headers=SECTRA_HEADERS)
    return JSONResponse({"detail": message}, status_code=status)


@app.exception_handler(RequestValidationError)
async def on_request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": ["body"], "msg": "invalid"}
    if request.url.path.startswith("/hooks/techcyte/"):
        unreadable = first.get("type") == "json_invalid" or (
            first.get("type") == "missing" and list(first["loc"]) == ["body"]
        )
        messages = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
        return JSONResponse({"detail": f"invalid request: {messages}"}, status_code=400 if unreadable else 422)
    where = ".".join(str(p) for p in first["loc"])
    return _error(request, 422, f"invalid request: {where}: {first['msg']}")


@app.exception_handler(UnknownWebhookKeyError)
async def on_unknown_key(request: Request, _exc: UnknownWebhookKeyError) -> JSONResponse:
    return _error(request, 404, "not found")


@app.exception_handler(ValidationFailedError)
async def on_validation_failed(request: Request, exc: ValidationFailedError) -> JSONResponse:
    return _error(request, 400, exc.message)


@app.exception_handler(UrlNotAllowedError)
async def on_url_not_allowed(request: Request, exc: UrlNotAllowedError) -> JSONResponse:
    return _error(request, 403, exc.message)


@app.exception_handler(SectraAuthError)
async def on_sectra_auth(request: Request, exc: SectraAuthError) -> JSONResponse:
    return _error(request, 502, f"Sectra refused our callback token: {exc}")


@app.exception_handler(SectraNotFoundError)
async def on_sectra_not_found(request: Request, exc: SectraNotFoundError) -> JSONResponse:
    return _error(request, 404, f"not found on the Sectra server: {exc}")


@app.exception_handler(SectraError)
async def on_sectra_error(request: Request, exc: SectraError) -> JSONResponse:
    return _error(request, 502, f"could not reach the Sectra server: {exc}")
