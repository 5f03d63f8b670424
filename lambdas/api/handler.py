"""The ``api`` Lambda: API Gateway REST proxy → Powertools resolver with one router per front door.

Domain errors map to HTTP here and nowhere else. Platform API errors use FastAPI's shapes
(``{"detail": …}``); Sectra's routes answer ``{"error": …}`` with our X-Sectra-* headers.

Importing this module stays cheap (a Lambda cold start, the local stack, every test process): the
error classes come from light modules, and the routes load their models, services, boto3 and httpx
with their first request (``lambdas.api.deps``); outside Lambda the X-Ray SDK is not loaded at all
(``lambdas.observability``). ``tests/unit/test_api_cold_import.py`` keeps it so.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.api import platform_routes, sectra_routes, techcyte_routes
from lambdas.api.http import (
    AuthenticationError,
    RequestValidationError,
    UnknownWebhookKeyError,
    json_response,
)
from lambdas.observability import metrics, observe_api_requests, tracer
from slidebridge.errors import (
    ArtifactGoneError,
    ConflictError,
    IllegalTransitionError,
    ListQueryError,
    MetadataSchemaError,
    NotFoundError,
    PreconditionFailedError,
    SectraAuthError,
    SectraError,
    SectraNotFoundError,
    SlidebridgeError,
    UrlNotAllowedError,
    ValidationFailedError,
)

logger = Logger(service="slidebridge")
app = APIGatewayRestResolver()
app.include_router(platform_routes.router)
app.include_router(sectra_routes.router)
app.include_router(techcyte_routes.router)


def _is_sectra() -> bool:
    return app.current_event.path.startswith("/hooks/sectra/")


def error(status: int, message: str, *, detail: Any = None) -> Response[str]:
    if _is_sectra():
        response = json_response(status, {"error": message})
        response.headers.update(sectra_routes.sectra_headers())
        return response
    return json_response(status, {"detail": detail if detail is not None else message})


def _is_techcyte() -> bool:
    return app.current_event.path.startswith("/hooks/techcyte/")


@app.exception_handler(RequestValidationError)
def on_request_validation(exc: RequestValidationError) -> Response[str]:
    first = exc.errors[0] if exc.errors else {"loc": ["body"], "msg": "invalid"}
    where = ".".join(str(p) for p in first["loc"])
    message = f"invalid request: {where}: {first['msg']}"
    if _is_techcyte():
        # Techcyte's example answers {"detail": "Invalid request: ..."}; 400 when the body is not JSON.
        unreadable = first.get("type") == "json_invalid" or (
            first.get("type") == "missing" and list(first["loc"]) == ["body"]
        )
        status = 400 if unreadable else 422
        messages = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors[:5])
        return json_response(status, {"detail": f"invalid request: {messages}"})
    return error(422, message, detail=exc.errors)


@app.exception_handler(ListQueryError)
def on_list_query(exc: ListQueryError) -> Response[str]:
    # A bad page, sort or filter parameter: 422 in FastAPI's shape, unlike other ValidationFailedErrors (400).
    response: Response[str] = on_request_validation(RequestValidationError([exc.detail()]))
    return response


@app.exception_handler(MetadataSchemaError)
def on_metadata_schema(exc: MetadataSchemaError) -> Response[str]:
    # POST /runs: an input artifact's metadata fails its version's metadata_schema; 422 naming item and field.
    response: Response[str] = on_request_validation(RequestValidationError([exc.detail()]))
    return response


@app.exception_handler(PreconditionFailedError)
def on_precondition_failed(exc: PreconditionFailedError) -> Response[str]:
    # A stale custom_metadata_checksum: someone changed the metadata since the caller read it.
    return error(412, str(exc))


@app.exception_handler(ValidationFailedError)
def on_validation_failed(exc: ValidationFailedError) -> Response[str]:
    return error(400, exc.message)


@app.exception_handler(UrlNotAllowedError)
def on_url_not_allowed(exc: UrlNotAllowedError) -> Response[str]:
    # Sectra: callbackInfo.url outside the per-site allowlist; nothing stored, nothing sent to it.
    return error(403, exc.message)


@app.exception_handler(AuthenticationError)
def on_authentication(exc: AuthenticationError) -> Response[str]:
    response = error(401, str(exc))
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


@app.exception_handler(UnknownWebhookKeyError)
def on_unknown_key(_exc: UnknownWebhookKeyError) -> Response[str]:
    return error(404, "not found")


@app.exception_handler(ArtifactGoneError)
def on_gone(exc: ArtifactGoneError) -> Response[str]:
    return error(410, str(exc))


@app.exception_handler(NotFoundError)
def on_not_found(exc: NotFoundError) -> Response[str]:
    return error(404, str(exc))


@app.exception_handler(IllegalTransitionError)
def on_illegal_transition(exc: IllegalTransitionError) -> Response[str]:
    return error(409, str(exc))


@app.exception_handler(ConflictError)
def on_conflict(exc: ConflictError) -> Response[str]:
    return error(409, str(exc))


@app.exception_handler(SectraAuthError)
def on_sectra_auth(exc: SectraAuthError) -> Response[str]:
    return error(502, f"Sectra refused our callback token: {exc}")


@app.exception_handler(SectraNotFoundError)
def on_sectra_not_found(exc: SectraNotFoundError) -> Response[str]:
    # E.g. a slideId the Sectra server does not know: the invocation is at fault, nothing was stored.
    return error(404, f"not found on the Sectra server: {exc}")


@app.exception_handler(SectraError)
def on_sectra_error(exc: SectraError) -> Response[str]:
    logger.warning("sectra call failed", extra={"error": str(exc)})
    return error(502, f"could not reach the Sectra server: {exc}")


@app.exception_handler(SlidebridgeError)
def on_other_domain_error(exc: SlidebridgeError) -> Response[str]:
    logger.exception("unhandled domain error")
    return error(500, "internal error")


@app.exception_handler(Exception)
def on_unexpected(exc: Exception) -> Response[str]:
    # Our fault: log it with its traceback (ids only, never bodies), answer a plain 500.
    logger.exception("unhandled error", extra={"error_type": type(exc).__name__})
    return error(500, "internal error")


@app.not_found
def on_unknown_route(_exc: Exception) -> Response[str]:
    return error(404, f"no route for {app.current_event.http_method} {app.current_event.path}")


# Responses can carry presigned URLs and vendor data: traces record neither responses nor exception text.
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)
@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True, correlation_id_path=correlation_paths.API_GATEWAY_REST)
@observe_api_requests(logger)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
