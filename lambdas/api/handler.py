"""The ``api`` Lambda: API Gateway REST proxy → Powertools resolver with one router per front door.

Domain errors map to HTTP here and nowhere else.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.api import platform_routes
from lambdas.api.http import AuthenticationError, RequestValidationError, error_response, json_response
from slidebridge.errors import (
    ConflictError,
    IllegalTransitionError,
    NotFoundError,
    ValidationFailedError,
)
from slidebridge.platform import ArtifactGoneError

logger = Logger(service="slidebridge")
app = APIGatewayRestResolver(strip_prefixes=None)
app.include_router(platform_routes.router)


@app.exception_handler(RequestValidationError)
def on_request_validation(exc: RequestValidationError) -> Response[str]:
    return json_response(422, {"detail": exc.errors})


@app.exception_handler(ValidationFailedError)
def on_validation_failed(exc: ValidationFailedError) -> Response[str]:
    return error_response(400, exc.message)


@app.exception_handler(AuthenticationError)
def on_authentication(exc: AuthenticationError) -> Response[str]:
    response = error_response(401, str(exc))
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


@app.exception_handler(ArtifactGoneError)
def on_gone(exc: ArtifactGoneError) -> Response[str]:
    return error_response(410, str(exc))


@app.exception_handler(NotFoundError)
def on_not_found(exc: NotFoundError) -> Response[str]:
    return error_response(404, str(exc))


@app.exception_handler(IllegalTransitionError)
def on_illegal_transition(exc: IllegalTransitionError) -> Response[str]:
    return error_response(409, str(exc))


@app.exception_handler(ConflictError)
def on_conflict(exc: ConflictError) -> Response[str]:
    return error_response(409, str(exc))


@app.not_found
def on_unknown_route(_exc: Exception) -> Response[str]:
    return error_response(404, f"no route for {app.current_event.http_method} {app.current_event.path}")


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
