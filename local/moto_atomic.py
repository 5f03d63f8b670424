"""Make moto's DynamoDB apply each request atomically, as the real service does.

moto's DynamoDB backend takes no locks. Under concurrent callers (threads in one test, or the
threaded moto server of the local stack, where array children of a job write at once) its
``TransactWriteItems`` is not atomic: a cancelled transaction restores a deep copy of the table it
took when it began, erasing every write that other requests made in between. Real DynamoDB never
loses a committed write, and our optimistic concurrency (version conditions, counter ``ADD``) relies
on exactly that. One lock around each DynamoDB request gives the local stack and the tests the
service's guarantee; other moto services keep running concurrently.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

_LOCK = threading.RLock()
_MARK = "_slidebridge_atomic"


def serialize_dynamodb_requests() -> None:
    """Patch moto's DynamoDB request handler to run one request at a time (idempotent)."""
    from moto.dynamodb.responses import DynamoHandler  # noqa: PLC0415 - moto only where it runs

    original = DynamoHandler.call_action
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def call_action(self: DynamoHandler) -> Any:
        with _LOCK:
            return original(self)

    setattr(call_action, _MARK, True)
    DynamoHandler.call_action = call_action  # type: ignore[method-assign]
