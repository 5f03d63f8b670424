"""Pagination, sorting and query-parameter parsing for the Platform API's lists (no AWS)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from slidebridge.listing import (
    APPLICATION_SORT_FIELDS,
    ITEM_SORT_FIELDS,
    RUN_SORT_FIELDS,
    ListQuery,
    ListQueryError,
    SortKey,
    jsonb_key,
    parse_enum,
    parse_page,
    parse_sort,
    sort_records,
    split_values,
)
from slidebridge.runs import ItemState


@dataclass
class Row:
    id: str
    name: str | None = None
    when: datetime | None = None
    meta: Any = None


def field(row: Row, name: str) -> Any:
    return getattr(row, name)


def ids(rows: list[Row]) -> list[str]:
    return [r.id for r in rows]


# --- page and page size --------------------------------------------------------------------------


def test_defaults() -> None:
    assert parse_page({}) == (1, 50)
    query = ListQuery.from_params({}, RUN_SORT_FIELDS)
    assert (query.page, query.page_size, query.sort) == (1, 50, ())


@pytest.mark.parametrize("name", ["page_size", "page-size"])
def test_both_page_size_spellings(name: str) -> None:
    assert parse_page({"page": ["3"], name: ["20"]}) == (3, 20)


@pytest.mark.parametrize(
    ("params", "loc", "error_type"),
    [
        ({"page_size": ["4"]}, ["query", "page_size"], "greater_than_equal"),
        ({"page_size": ["101"]}, ["query", "page_size"], "less_than_equal"),
        ({"page-size": ["4"]}, ["query", "page-size"], "greater_than_equal"),
        ({"page_size": ["ten"]}, ["query", "page_size"], "int_parsing"),
        ({"page": ["0"]}, ["query", "page"], "greater_than_equal"),
        ({"page": ["-1"]}, ["query", "page"], "greater_than_equal"),
        ({"page": ["x"]}, ["query", "page"], "int_parsing"),
    ],
)
def test_out_of_range_or_non_integer_is_a_422_in_fastapi_shape(
    params: dict[str, list[str]], loc: list[str], error_type: str
) -> None:
    with pytest.raises(ListQueryError) as caught:
        parse_page(params)
    detail = caught.value.detail()
    assert detail["loc"] == loc
    assert detail["type"] == error_type
    assert detail["input"] == params[loc[1]][0]
    assert detail["msg"].startswith("Input should be")


def test_page_size_limits_are_inclusive() -> None:
    assert parse_page({"page_size": ["5"]}) == (1, 5)
    assert parse_page({"page_size": ["100"]}) == (1, 100)


def test_conflicting_spellings_are_refused_but_equal_ones_accepted() -> None:
    assert parse_page({"page_size": ["10"], "page-size": ["10"]}) == (1, 10)
    with pytest.raises(ListQueryError, match="disagree"):
        parse_page({"page_size": ["10"], "page-size": ["20"]})


def test_the_last_of_repeated_scalar_parameters_wins() -> None:
    assert parse_page({"page": ["1", "2"]}) == (2, 50)


# --- sort ----------------------------------------------------------------------------------------


def test_sort_prefixes() -> None:
    params = {"sort": ["-submitted_at", "+run_id", " application_id", "version_number"]}
    assert parse_sort(params, RUN_SORT_FIELDS) == (
        SortKey(field="submitted_at", descending=True),
        SortKey(field="run_id"),
        SortKey(field="application_id"),
        SortKey(field="version_number"),
    )


@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        ("state", RUN_SORT_FIELDS),
        ("-state", RUN_SORT_FIELDS),
        ("submitted_at", ITEM_SORT_FIELDS),
        ("", RUN_SORT_FIELDS),
    ],
)
def test_unknown_sort_field_names_it_and_the_allowed_ones(value: str, allowed: tuple[str, ...]) -> None:
    with pytest.raises(ListQueryError) as caught:
        parse_sort({"sort": [allowed[0], value]}, allowed)
    detail = caught.value.detail()
    assert detail["loc"] == ["query", "sort", 1]
    assert detail["input"] == value
    assert repr(value.lstrip("-")) in detail["msg"]
    for name in allowed:
        assert name in detail["msg"]


def test_sort_fields_are_exactly_the_specs() -> None:
    assert set(APPLICATION_SORT_FIELDS) == {"application_id", "name", "description", "regulatory_classes"}
    assert set(ITEM_SORT_FIELDS) == {"item_id", "external_id", "custom_metadata", "terminated_at", "termination_reason"}
    assert "state" not in RUN_SORT_FIELDS
    assert len(RUN_SORT_FIELDS) == 8


def test_sort_by_several_keys_then_the_tiebreak() -> None:
    rows = [Row("d", "b"), Row("a", "b"), Row("c", "a"), Row("b", "a")]
    ordered = sort_records(rows, [SortKey(field="name")], field, tiebreak=lambda r: r.id)
    assert ids(ordered) == ["b", "c", "a", "d"]
    ordered = sort_records(rows, [SortKey(field="name", descending=True)], field, tiebreak=lambda r: r.id)
    assert ids(ordered) == ["a", "d", "b", "c"]  # ties stay in tiebreak order when descending too


def test_nulls_last_ascending_and_first_descending_like_postgres() -> None:
    t1, t2 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    rows = [Row("a", when=t2), Row("b"), Row("c", when=t1)]
    assert ids(sort_records(rows, [SortKey(field="when")], field, tiebreak=lambda r: r.id)) == ["c", "a", "b"]
    desc = [SortKey(field="when", descending=True)]
    assert ids(sort_records(rows, desc, field, tiebreak=lambda r: r.id)) == ["b", "a", "c"]


def test_json_values_sort_like_jsonb() -> None:
    # Object > Array > Boolean > Number > String > Null; objects by pair count, then pairs
    # (this order was checked against PostgreSQL 15's ORDER BY on jsonb).
    values = [{"b": 1}, {"a": 1, "b": 2}, [1, 2], [3], True, False, 10, 2.5, "z", "a", None, {"a": 2}, {"aa": 0}]
    assert sorted(values, key=jsonb_key) == [
        None,
        "a",
        "z",
        2.5,
        10,
        False,
        True,
        [3],
        [1, 2],
        {"a": 2},
        {"aa": 0},
        {"b": 1},
        {"a": 1, "b": 2},
    ]
    # Pairs are compared in jsonb's storage order: shorter keys first, so "k" before "aaa" here.
    assert sorted([{"aaa": 1, "k": 2}, {"aaa": 2, "k": 1}], key=jsonb_key) == [{"aaa": 2, "k": 1}, {"aaa": 1, "k": 2}]


def test_custom_metadata_sort_puts_missing_metadata_last() -> None:
    rows = [Row("a", meta={"study": "b"}), Row("b", meta=None), Row("c", meta={"study": "a"})]
    ordered = sort_records(rows, [SortKey(field="meta")], field, tiebreak=lambda r: r.id)
    assert ids(ordered) == ["c", "a", "b"]


# --- applying a query ----------------------------------------------------------------------------


def test_pages_cover_every_record_once_and_past_the_end_is_empty() -> None:
    rows = [Row(f"{i:03d}", name=f"n{i % 3}") for i in range(23)]
    seen: list[str] = []
    for page in range(1, 6):
        query = ListQuery(page=page, page_size=5, sort=(SortKey(field="name"),))
        seen.extend(ids(query.apply(rows, field, tiebreak=lambda r: r.id)))
    assert sorted(seen) == sorted(ids(rows))
    assert len(seen) == 23
    assert ListQuery(page=6, page_size=5).apply(rows, field, tiebreak=lambda r: r.id) == []


def test_default_order_is_the_input_order_and_reads_only_what_the_page_needs() -> None:
    consumed: list[int] = []

    def lazily() -> Iterator[Row]:
        for i in range(1000):
            consumed.append(i)
            yield Row(str(i))

    page = ListQuery(page=2, page_size=10).apply(lazily(), field, tiebreak=lambda r: r.id)
    assert ids(page) == [str(i) for i in range(10, 20)]
    assert len(consumed) == 20


def _arrival_rows(descending: bool) -> list[Row]:
    # 60 rows, 4 per timestamp (ties), in the store's order by ``when``; ids not in tiebreak order.
    rows = [
        Row(f"{(7 * i) % 60:02d}", name=f"n{i % 5}", when=datetime(2026, 3, 1, 9, i // 4, tzinfo=UTC))
        for i in range(60)
    ]
    return sorted(rows, key=lambda row: row.when or datetime.min.replace(tzinfo=UTC), reverse=descending)


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("then_by", [(), (SortKey(field="name"),), (SortKey(field="name", descending=True),)])
def test_sort_by_the_arrival_order_reads_only_the_page_and_its_ties_and_matches_a_full_sort(
    descending: bool, then_by: tuple[SortKey, ...]
) -> None:
    rows = _arrival_rows(descending)
    arrival = SortKey(field="when", descending=descending)
    consumed: list[Row] = []

    def lazily() -> Iterator[Row]:
        for row in rows:
            consumed.append(row)
            yield row

    for page in range(1, 14):
        consumed.clear()
        query = ListQuery(page=page, page_size=5, sort=(arrival, *then_by))
        fast = query.apply(lazily(), field, tiebreak=lambda r: r.id, arrival=arrival)
        # The same page as when every record is read and sorted (ties on ``when`` ordered alike).
        assert ids(fast) == ids(query.apply(rows, field, tiebreak=lambda r: r.id)), page
        # Read: the page's end, rounded up to its timestamp's tie group of 4, and one more to see it end.
        assert len(consumed) == min(-(-query.end // 4) * 4 + 1, len(rows)), page


def test_sort_not_led_by_the_arrival_order_reads_everything() -> None:
    rows = _arrival_rows(descending=True)
    consumed: list[Row] = []

    def lazily() -> Iterator[Row]:
        for row in rows:
            consumed.append(row)
            yield row

    arrival = SortKey(field="when", descending=True)
    for sort in [(SortKey(field="name"), arrival), (SortKey(field="when"),)]:
        consumed.clear()
        query = ListQuery(page=1, page_size=5, sort=sort)
        assert not query.reads_early_part(arrival)
        page = query.apply(lazily(), field, tiebreak=lambda r: r.id, arrival=arrival)
        assert ids(page) == ids(query.apply(rows, field, tiebreak=lambda r: r.id))
        assert len(consumed) == len(rows)


# --- other parameters ----------------------------------------------------------------------------


def test_split_values_accepts_repeated_and_comma_separated() -> None:
    assert split_values({"external_id__in": ["a", "b,c", ",", "a"]}, "external_id__in") == ["a", "b,c", "b", "c"]
    assert split_values({}, "external_id__in") == []


def test_parse_enum() -> None:
    assert parse_enum({"state": ["TERMINATED"]}, "state", ItemState) is ItemState.TERMINATED
    assert parse_enum({}, "state", ItemState) is None
    with pytest.raises(ListQueryError) as caught:
        parse_enum({"state": ["terminated"]}, "state", ItemState)
    detail = caught.value.detail()
    assert detail["loc"] == ["query", "state"]
    assert "'PENDING', 'PROCESSING' or 'TERMINATED'" in detail["msg"]
