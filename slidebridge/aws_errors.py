"""Which AWS SDK errors are worth another attempt of the whole job.

botocore retries each call itself (throttling, 5xx, dropped connections); an error that still comes
out is one its retries gave up on. Those are transient all the same: a job attempt minutes later
usually succeeds, whereas ending the item SYSTEM_ERROR throws away the analysis. botocore's own
classifiers (``botocore.retries.standard``) decide, so the list of throttling codes stays botocore's.
"""

from __future__ import annotations

from types import SimpleNamespace

from botocore.exceptions import ClientError
from botocore.retries.standard import RetryContext, ThrottledRetryableChecker, TransientRetryableChecker

_CHECKERS = (TransientRetryableChecker(), ThrottledRetryableChecker())


def is_transient_aws_error(exc: BaseException) -> bool:
    """True for throttling, 5xx answers, timeouts and connection failures of an AWS call."""
    parsed = exc.response if isinstance(exc, ClientError) else None
    status = (parsed or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    context = RetryContext(
        attempt_number=1,
        parsed_response=parsed,
        # The checkers read only status_code from the HTTP response.
        http_response=SimpleNamespace(status_code=status) if status is not None else None,
        caught_exception=exc,
    )
    return any(checker.is_retryable(context) for checker in _CHECKERS)
