"""Small pieces every vendor module shares: display formats, colours, retry policy, error text."""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

import httpx
from pydantic import ValidationError

if TYPE_CHECKING:
    from slidebridge.analysis import RGB

# Longest wait a peer's Retry-After may impose on us (seconds).
MAX_RETRY_AFTER_S = 30.0


def fmt_mm2(area: float) -> str:
    return f"{area:.2f} mm²" if area < 10 else f"{area:.1f} mm²"


def fmt_pct(fraction: float) -> str:
    if 0 < fraction < 0.005:
        return "<1 %"
    return f"{100 * fraction:.0f} %"


def hex_color(color: RGB, alpha: int | None = None) -> str:
    """``#RRGGBB`` (or ``#RRGGBBAA`` with ``alpha``), channels clamped to 0–255."""
    r, g, b = (max(0, min(255, int(c))) for c in color)
    return f"#{r:02X}{g:02X}{b:02X}" + ("" if alpha is None else f"{alpha:02X}")


def none_to_dict(value: object) -> object:
    """Vendors send ``null`` where they mean "nothing": a validator's ``before`` step."""
    return {} if value is None else value


def retryable_status(status: int) -> bool:
    """Throttling and server errors: a later attempt may succeed."""
    return status == 429 or status >= 500


def backoff_sleep(
    backoff_s: float, attempt: int, response: httpx.Response | None = None, *, max_delay_s: float | None = None
) -> None:
    """Exponential backoff with jitter, stretched to the peer's ``Retry-After`` (capped, and at most
    ``max_delay_s``: the time a caller with a deadline has left)."""
    delay = backoff_s * (2**attempt) * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not crypto
    if response is not None and (retry_after := response.headers.get("retry-after", "")).isdigit():
        delay = max(delay, min(float(retry_after), MAX_RETRY_AFTER_S))
    if max_delay_s is not None:
        delay = min(delay, max_delay_s)
    if delay > 0:
        time.sleep(delay)


def describe_validation_error(exc: ValidationError, *, limit: int = 5) -> str:
    """``"loc: message; …"`` for a 4xx answer or a log line: never the input values.

    ``exc.errors()`` carries each offending ``input`` (tokens, PHI): it is never returned.
    """
    problems = [
        f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}" for error in exc.errors()[:limit]
    ]
    more = exc.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")
