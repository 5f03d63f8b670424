"""Domain errors. Each says who is at fault, which decides the item's termination reason.

- ``UserInputError``: the input is at fault (item ``USER_ERROR``, never retried).
- ``RetryableError``: a transient failure of ours or a peer's (the job exits 75 and Batch retries).
- anything else reaching the job's top level is a ``SYSTEM_ERROR``.
"""

from __future__ import annotations


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
