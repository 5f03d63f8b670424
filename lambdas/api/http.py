"""HTTP plumbing shared by the routes: JSON bodies, FastAPI-style errors, parameter checks."""

from __future__ import annotations

import binascii
import json
import uuid
from typing import Any, TypeVar

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.utilities.data_classes.common import BaseProxyEvent
from pydantic import BaseModel, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from slidebridge.errors import SlidebridgeError

ModelT = TypeVar("ModelT", bound=BaseModel)
JSON = "application/json"


class AuthenticationError(SlidebridgeError):
    """No valid credentials (HTTP 401)."""


class UnknownWebhookKeyError(SlidebridgeError):
    """A webhook path key that matches no vendor's key (HTTP 404, nothing touched)."""


class RequestValidationError(SlidebridgeError):
    """The request's shape is wrong (HTTP 422 with FastAPI's ``HTTPValidationError`` body)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("request validation failed")
        self.errors = errors


def json_response(status: int, payload: BaseModel | list[Any] | dict[str, Any] | None) -> Response[str]:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else TypeAdapter(Any).dump_json(payload).decode()
    return Response(status_code=status, content_type=JSON, body=body)


def error_response(status: int, detail: Any) -> Response[str]:
    return json_response(status, {"detail": detail})


def parse_body(event: BaseProxyEvent, model: type[ModelT]) -> ModelT:
    """Parse a JSON body into ``model``; every fault becomes a 422 naming the field and the reason."""
    try:
        raw = event.decoded_body if event.is_base64_encoded else event.body
        if not raw:
            raise RequestValidationError(
                [{"loc": ["body"], "msg": "a JSON request body is required", "type": "missing", "input": None}]
            )
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, binascii.Error) as exc:
        position = exc.pos if isinstance(exc, json.JSONDecodeError) else 0
        raise RequestValidationError(
            [
                {
                    "loc": ["body", position],
                    "msg": f"body is not valid UTF-8 JSON: {exc}",
                    "type": "json_invalid",
                    "input": None,
                }
            ]
        ) from exc
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        raise RequestValidationError(
            [
                {
                    "loc": ["body", *error["loc"]],
                    "msg": error["msg"],
                    "type": error["type"],
                }
                for error in exc.errors(include_url=False, include_context=False)
            ]
        ) from exc


def require_uuid(name: str, value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise RequestValidationError(
            [
                {
                    "loc": ["path", name],
                    "msg": "Input should be a valid UUID",
                    "type": "uuid_parsing",
                    "input": value,
                }
            ]
        ) from None
