"""Build API Gateway REST proxy events from the JSON fixture, and a Lambda context, for handler tests."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"


@lru_cache(maxsize=1)
def _template() -> dict[str, Any]:
    return json.loads((FIXTURES / "apigw_rest_proxy_event.json").read_text())


def api_event(
    method: str,
    path: str,
    *,
    body: Any = None,
    raw_body: str | None = None,
    token: str | None = None,
    query: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    event = copy.deepcopy(_template())
    event["httpMethod"] = method
    event["path"] = path
    event["pathParameters"] = {"proxy": path.lstrip("/")}
    event["requestContext"]["httpMethod"] = method
    event["requestContext"]["path"] = "/prod" + path
    if token is not None:
        event["headers"]["Authorization"] = f"Bearer {token}"
        event["multiValueHeaders"]["Authorization"] = [f"Bearer {token}"]
    if body is not None or raw_body is not None:
        event["body"] = raw_body if raw_body is not None else json.dumps(body)
        event["headers"]["Content-Type"] = "application/json"
        event["multiValueHeaders"]["Content-Type"] = ["application/json"]
    if query:
        event["multiValueQueryStringParameters"] = query
        event["queryStringParameters"] = {k: v[-1] for k, v in query.items()}
    return event


class LambdaContext:
    function_name = "slidebridge-api"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:eu-central-1:123456789012:function:slidebridge-api"
    aws_request_id = "test-request"

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 29_000
