"""Pagination, sorting and query-parameter parsing for the Platform API's list operations.

Pure functions, no AWS (vendors/PLATFORM_API.md §6–§7):

- ``page`` (≥ 1) and ``page_size`` (5..100, default 50). Only ``/applications`` spells it
  ``page-size`` in the spec; both spellings are accepted everywhere.
- repeated ``sort=<field>``: ``-`` descending, ``+`` or nothing ascending. The generated client does
  not URL-encode multi-valued parameters, so ``sort=+name`` arrives as ``" name"``: a leading space
  counts as ``+``.
- order is stable across pages: records whose sort values tie keep a caller-given unique tiebreak.
- sort values are ordered like PostgreSQL orders the real platform's columns: NULLs last when
  ascending and first when descending, JSON (``custom_metadata``) in jsonb's btree order.

Bad parameters raise ``ListQueryError`` (HTTP 422 in FastAPI's ``HTTPValidationError`` shape).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from enum import Enum
from itertools import islice
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

# Defined with the other errors (the api handler maps it without importing this module).
from slidebridge.errors import ListQueryError

T = TypeVar("T")
E = TypeVar("E", bound=Enum)

# Query parameters as API Gateway's multiValueQueryStringParameters give them: name → every value.
QueryParams = Mapping[str, Sequence[str]]

DEFAULT_PAGE_SIZE = 50
MIN_PAGE_SIZE = 5
MAX_PAGE_SIZE = 100

# §7, exactly as the spec lists them.
APPLICATION_SORT_FIELDS = ("application_id", "name", "description", "regulatory_classes")
RUN_SORT_FIELDS = (
    "run_id",
    "application_id",
    "version_number",
    "custom_metadata",
    "submitted_at",
    "submitted_by",
    "terminated_at",
    "termination_reason",
)
ITEM_SORT_FIELDS = ("item_id", "external_id", "custom_metadata", "terminated_at", "termination_reason")

# pydantic does the integer checks so the 422 messages read exactly like FastAPI's.
_PAGE = TypeAdapter(Annotated[int, Field(ge=1)])
_PAGE_SIZE = TypeAdapter(Annotated[int, Field(ge=MIN_PAGE_SIZE, le=MAX_PAGE_SIZE)])


# --- parameter access ----------------------------------------------------------------------------


def last_value(params: QueryParams, name: str) -> str | None:
    """A scalar parameter: the last occurrence wins, as in API Gateway's single-value map."""
    values = params.get(name)
    return values[-1] if values else None


def split_values(params: QueryParams, name: str) -> list[str]:
    """A multi-valued parameter given repeated (``a=x&a=y``), comma-separated (``a=x,y``) or both.

    Empty parts are dropped. Each raw value is kept as well as its parts, so a value that itself
    contains a comma (an ``external_id`` such as ``"a,b.svs"``) still matches exactly.
    """
    found: list[str] = []
    for raw in params.get(name, ()):
        for value in (raw, *raw.split(",")):
            if value.strip(",") and value not in found:
                found.append(value)
    return found


def parse_enum(params: QueryParams, name: str, enum: type[E]) -> E | None:
    """An optional enum parameter; an unknown value is a 422 listing the allowed ones."""
    raw = last_value(params, name)
    if raw is None:
        return None
    try:
        return TypeAdapter(enum).validate_python(raw)
    except PydanticValidationError as exc:
        raise _from_pydantic(exc, name) from None


def _from_pydantic(exc: PydanticValidationError, name: str) -> ListQueryError:
    error = exc.errors(include_url=False)[0]
    return ListQueryError(
        error["msg"],
        loc=("query", name),
        error_type=error["type"],
        input_value=error.get("input"),
        ctx={k: v if isinstance(v, str | int | float | bool) else str(v) for k, v in error.get("ctx", {}).items()},
    )


# --- the query -----------------------------------------------------------------------------------


class SortKey(BaseModel):
    model_config = ConfigDict(frozen=True)

    field: str
    descending: bool = False


class ListQuery(BaseModel):
    """Which page of a list, in which order."""

    model_config = ConfigDict(frozen=True)

    page: int = Field(default=1, ge=1)
    page_size: int = Field(default=DEFAULT_PAGE_SIZE, ge=MIN_PAGE_SIZE, le=MAX_PAGE_SIZE)
    sort: tuple[SortKey, ...] = ()

    @classmethod
    def from_params(cls, params: QueryParams, sort_fields: Sequence[str]) -> ListQuery:
        page, page_size = parse_page(params)
        return cls(page=page, page_size=page_size, sort=parse_sort(params, sort_fields))

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.page_size

    @property
    def end(self) -> int:
        """How many records precede this page's end, counting its own."""
        return self.offset + self.page_size

    def reads_early_part(self, arrival: SortKey | None) -> bool:
        """Whether ``apply`` stops reading records that come in ``arrival`` order once the page is full."""
        return not self.sort or self.sort[0] == arrival

    def apply(
        self,
        records: Iterable[T],
        value_of: Callable[[T, str], Any],
        *,
        tiebreak: Callable[[T], Any],
        arrival: SortKey | None = None,
    ) -> list[T]:
        """This page of ``records`` in the requested order.

        Without ``sort``, ``records`` are taken to be in the resource's default order already and are
        consumed only as far as this page needs (so a lazy store query can stop early). With ``sort``,
        ties fall back to ``tiebreak`` (a unique key) so pages stay stable. ``arrival`` is the order
        ``records`` come in, if they come ordered by one field (runs by ``submitted_at``): a ``sort``
        that starts with that key reads only as far as the page and the records tied with its last
        one; any other ``sort`` reads everything.
        """
        if not self.sort:
            return list(islice(records, self.offset, self.end))
        if self.sort[0] == arrival:
            records = _leading(records, self.end, key=lambda record: sort_value(value_of(record, arrival.field)))
        ordered = sort_records(records, self.sort, value_of, tiebreak=tiebreak)
        return ordered[self.offset : self.end]


def _leading(records: Iterable[T], count: int, *, key: Callable[[T], Any]) -> list[T]:
    """The first ``count`` of ``records`` (which come ordered by ``key``) and all that tie with the last.

    Whatever comes later has a worse first sort key than every record of the page, and the tied
    ones are kept so that the other keys and the tiebreak order them exactly as a full sort would.
    """
    taken: list[T] = []
    for record in records:
        if len(taken) >= count and key(record) != key(taken[-1]):
            break
        taken.append(record)
    return taken


def parse_page(params: QueryParams) -> tuple[int, int]:
    """``page`` and ``page_size`` (or ``page-size``); 422 when out of range or not an integer."""
    page = 1
    raw_page = last_value(params, "page")
    if raw_page is not None:
        try:
            page = _PAGE.validate_python(raw_page)
        except PydanticValidationError as exc:
            raise _from_pydantic(exc, "page") from None
    given = [(name, value) for name in ("page_size", "page-size") if (value := last_value(params, name)) is not None]
    if len(given) == 2 and given[0][1] != given[1][1]:
        raise ListQueryError(
            f"page_size={given[0][1]!r} and page-size={given[1][1]!r} disagree; give one of them",
            loc=("query", "page_size"),
            input_value=given[0][1],
        )
    page_size = DEFAULT_PAGE_SIZE
    if given:
        name, raw_size = given[0]
        try:
            page_size = _PAGE_SIZE.validate_python(raw_size)
        except PydanticValidationError as exc:
            raise _from_pydantic(exc, name) from None
    return page, page_size


def parse_sort(params: QueryParams, allowed: Sequence[str]) -> tuple[SortKey, ...]:
    """Repeated ``sort`` values: ``-field`` descending; ``+field``, ``" field"`` or ``field`` ascending."""
    keys: list[SortKey] = []
    for index, raw in enumerate(params.get("sort", ())):
        descending = raw.startswith("-")
        # " name" is "+name" after the unencoded "+" was decoded to a space (PLATFORM_API.md §7).
        field = raw[1:] if raw[:1] in ("-", "+", " ") else raw
        if field not in allowed:
            expected = ", ".join(allowed)
            raise ListQueryError(
                f"unknown sort field {field!r}; allowed: {expected} (prefix - for descending, + or none for ascending)",
                loc=("query", "sort", index),
                error_type="enum",
                input_value=raw,
                ctx={"expected": expected},
            )
        keys.append(SortKey(field=field, descending=descending))
    return tuple(keys)


# --- ordering ------------------------------------------------------------------------------------


def sort_records(
    records: Iterable[T],
    keys: Sequence[SortKey],
    value_of: Callable[[T, str], Any],
    *,
    tiebreak: Callable[[T], Any],
) -> list[T]:
    """``records`` ordered by ``keys`` in turn, then by ``tiebreak`` ascending.

    Python's sort is stable (also with ``reverse=True``), so sorting by the last key first and the
    first key last yields the lexicographic order over all keys.
    """
    ordered = sorted(records, key=tiebreak)
    for key in reversed(keys):
        values = {id(record): sort_value(value_of(record, key.field)) for record in ordered}
        ordered.sort(key=lambda record: values[id(record)], reverse=key.descending)
    return ordered


def sort_value(value: Any) -> tuple[Any, ...]:
    """A comparable key for one field's value; None (SQL NULL) sorts after every value.

    With ``reverse=True`` that puts NULLs first, which is PostgreSQL's default for DESC as well.
    """
    if value is None:
        return (1,)
    if isinstance(value, Enum):
        return (0, value.value)
    if isinstance(value, datetime | str | int | float):
        return (0, value)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        # A text[] column (regulatory_classes): element by element, as PostgreSQL compares arrays.
        return (0, tuple(value))
    return (0, jsonb_key(value))


def jsonb_key(value: Any) -> tuple[Any, ...]:
    """A key that orders JSON values like PostgreSQL's jsonb btree operator class.

    Object > Array > Boolean > Number > String > Null; objects with more pairs sort after those with
    fewer, then key, value, key, value ... taking the pairs in jsonb's storage order (shorter keys
    first, then bytewise); arrays with more elements after those with fewer, then element by element.
    Strings, keys included, compare by code point (the C collation; the platform's collation may differ
    for non-ASCII text).
    """
    if value is None:
        return (0,)
    if isinstance(value, str):
        return (1, value)
    if isinstance(value, bool):  # before numbers: bool is an int in Python
        return (3, value)
    if isinstance(value, int | float):
        return (2, value)
    if isinstance(value, list | tuple):
        return (4, len(value), tuple(jsonb_key(v) for v in value))
    if isinstance(value, dict):
        pairs = sorted(value.items(), key=lambda kv: (len(kv[0].encode()), kv[0].encode()))
        return (5, len(pairs), tuple((k, jsonb_key(v)) for k, v in pairs))
    raise TypeError(f"not a JSON value: {type(value).__name__}")
