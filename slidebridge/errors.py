"""Domain errors. Each says who is at fault, which decides the item's termination reason.

- ``UserInputError``: the input is at fault (item ``USER_ERROR``, never retried).
- ``RetryableError``: a transient failure of ours or a peer's (the job exits 75 and Batch retries).
- anything else reaching the job's top level is a ``SYSTEM_ERROR``.
"""

from __future__ import annotations

from typing import Any


class SlidebridgeError(Exception):
    """Base of every error slidebridge raises on purpose."""


class UserInputError(SlidebridgeError):
    """The input is at fault; ``code`` becomes the item's ``error_code``."""

    code = "USER_ERROR"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class UrlNotAllowedError(UserInputError):
    code = "URL_NOT_ALLOWED"


class UrlExpiredError(UserInputError):
    code = "URL_EXPIRED"


class UrlForbiddenError(UserInputError):
    code = "URL_FORBIDDEN"


class DownloadFailedError(UserInputError):
    code = "DOWNLOAD_FAILED"


class ChecksumMismatchError(UserInputError):
    code = "CHECKSUM_MISMATCH"


class UnsupportedFormatError(UserInputError):
    code = "UNSUPPORTED_FORMAT"


class UnreadableSlideError(UserInputError):
    code = "UNREADABLE_SLIDE"


class RetryableError(SlidebridgeError):
    """Transient: a later attempt may succeed (network, throttling, spot reclaim)."""


# --- run store ---------------------------------------------------------------------------------


class NotFoundError(SlidebridgeError):
    """The run, item or artifact does not exist (or is not visible to the caller)."""


class IllegalTransitionError(SlidebridgeError):
    """A state change the run model forbids, e.g. TERMINATED → PROCESSING."""


class ConflictError(SlidebridgeError):
    """A conditional write lost against a concurrent writer and could not be re-applied."""


class ValidationFailedError(SlidebridgeError):
    """A semantically invalid request (HTTP 400), with the location of the fault."""

    def __init__(self, message: str, *, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.loc = loc


class PreconditionFailedError(SlidebridgeError):
    """A conditional request's precondition no longer holds, e.g. a stale ``custom_metadata_checksum`` (HTTP 412)."""


# --- Platform API (HTTP mapping in lambdas/api/handler.py) ---------------------------------------


class ListQueryError(ValidationFailedError):
    """A list operation's query parameter is invalid (HTTP 422, FastAPI's ``HTTPValidationError`` shape).

    ``loc`` names the parameter, e.g. ``("query", "page_size")``; ``error_type``, ``input`` and
    ``ctx`` complete one entry of ``detail``.
    """

    def __init__(
        self,
        message: str,
        *,
        loc: tuple[str | int, ...],
        error_type: str = "value_error",
        input_value: Any = None,
        ctx: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, loc=loc)
        self.error_type = error_type
        self.input_value = input_value
        self.ctx = ctx or {}

    def detail(self) -> dict[str, Any]:
        """One entry of FastAPI's ``{"detail": [...]}`` list."""
        entry: dict[str, Any] = {
            "loc": list(self.loc),
            "msg": self.message,
            "type": self.error_type,
            "input": self.input_value,
        }
        if self.ctx:
            entry["ctx"] = self.ctx
        return entry


class ArtifactGoneError(NotFoundError):
    """The artifact existed but has been deleted (HTTP 410)."""


class MetadataSchemaError(ValidationFailedError):
    """An input artifact's metadata fails its version's ``metadata_schema`` (HTTP 422, FastAPI's shape).

    The message and ``loc`` name the item (index and external_id) and the metadata field.
    """

    def __init__(self, message: str, *, loc: tuple[str | int, ...], input_value: Any = None) -> None:
        super().__init__(message, loc=loc)
        self.input_value = input_value

    def detail(self) -> dict[str, Any]:
        """One entry of FastAPI's ``{"detail": [...]}`` list."""
        return {"loc": list(self.loc), "msg": self.message, "type": "metadata_schema", "input": self.input_value}


# --- Sectra callbacks (slidebridge.vendors.sectra raises these and re-exports them) ---------------


class SectraError(SlidebridgeError):
    """A call to Sectra failed. The message names the method, path and status only.

    Never the token, never a response body (Sectra error texts may carry PHI, §13), never the host
    (it is in the run's context already).
    """

    def __init__(self, message: str, *, status: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.path = path


class SectraAuthError(SectraError):
    """401/403: the callback token was refused (expired? §13: its lifetime is undocumented)."""


class SectraNotFoundError(SectraError):
    """404: the slide or result does not exist (e.g. the user deleted our result)."""


class SectraConflictError(SectraError):
    """409/412 on PUT: our ``versionId`` is stale (someone else updated the result)."""


class SectraRedirectError(SectraError, UrlNotAllowedError):
    """Sectra answered a redirect: refused for callbacks, which carry a bearer token (§13)."""


class SectraUnavailableError(SectraError, RetryableError):
    """Connection errors, timeouts, 5xx or 429 persisted through every retry."""
