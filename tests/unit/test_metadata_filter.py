"""The ``custom_metadata`` filter: PostgreSQL SQL/JSON path (lax) semantics, and 422s that say where.

Every expected match below was checked against PostgreSQL 15's ``jsonb @? jsonpath`` when written.
"""

from __future__ import annotations

from typing import Any

import pytest

from slidebridge.listing import ListQueryError
from slidebridge.metadata_filter import MAX_FILTER_LENGTH, MetadataFilterError, parse_metadata_filter

RUN: dict[str, Any] = {
    "study": "high",
    "score": 0.8,
    "count": 10,
    "tags": ["draft", "final"],
    "a": {"b": 1, "c": 5, "d": "x"},
    "resources": {"gpu_count": 4, "memory_gb": 16},
    "items": [{"k": 1, "name": "first"}, {"k": 2}],
    "grid": [[1, 2], [3]],
    "nothing": None,
    "flag": True,
    "name": "Slide-A.svs",
    "my field": {"x y": 5},
    "sdk": {"version": "1.6.0"},
}


def matches(text: str, doc: dict[str, Any] | None = RUN) -> bool:
    return parse_metadata_filter(text).matches(doc)


# --- the documented examples -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "doc", "expected"),
    [
        ("$.study", {"study": "anything"}, True),
        ("$.study", {"other": 1}, False),
        ('$.study ? (@ == "high")', {"study": "high"}, True),
        ('$.study ? (@ == "high")', {"study": "low"}, False),
        ("$.score ? (@ > 0.75)", {"score": 0.8}, True),
        ("$.score ? (@ > 0.75)", {"score": 0.75}, False),
        ('$.tags[*] ? (@ == "draft")', {"tags": ["final", "draft"]}, True),
        ('$.tags[*] ? (@ == "draft")', {"tags": ["final"]}, False),
        ("study", {"study": "x"}, True),
        ("study", {"studies": "x"}, False),
        ('$.a ? (@.b == 1 && @.c < 2 || @.d == "x")', {"a": {"b": 1, "c": 1}}, True),
        ('$.a ? (@.b == 1 && @.c < 2 || @.d == "x")', {"a": {"b": 1, "c": 5, "d": "x"}}, True),
        ('$.a ? (@.b == 1 && @.c < 2 || @.d == "x")', {"a": {"b": 1, "c": 5, "d": "y"}}, False),
        (
            "$.resources ? (@.gpu_count > 2 && @.memory_gb >= 16)",
            {"resources": {"gpu_count": 4, "memory_gb": 16}},
            True,
        ),
        (
            "$.resources ? (@.gpu_count > 2 && @.memory_gb >= 16)",
            {"resources": {"gpu_count": 4, "memory_gb": 8}},
            False,
        ),
    ],
)
def test_documented_examples(text: str, doc: dict[str, Any], expected: bool) -> None:
    assert matches(text, doc) is expected


# --- paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$", True),
        ("lax $.study", True),
        ('"study"', True),
        ('$."my field"."x y"', True),
        ('$."my field".x', False),
        ("$.a.b", True),
        ("$.a.zzz", False),
        ("$.sdk.version", True),
        ("study.deeper", False),
        ("$.tags[0]", True),
        ("$.tags[1]", True),
        ("$.tags[2]", False),
        ("$.tags[5, 1]", True),
        ("$.items.k", True),  # lax: .k applies to every element of the array
        ("$.items[*].name", True),
        ("$.items[1].name", False),
        ("$.study[*]", True),  # lax: a scalar acts as a one-element array
        ("$.study[0]", True),
        ("$.study[1]", False),
        ("$.*.b", True),
        ("$.nothing", True),  # present with a JSON null: the path yields null, which is an item
        ("$.grid.x", False),
    ],
)
def test_paths_match_when_they_yield_anything(text: str, expected: bool) -> None:
    assert matches(text) is expected


def test_absent_metadata_never_matches_and_empty_matches_only_the_root() -> None:
    assert matches("$", None) is False
    assert matches("$.study", None) is False
    assert matches("$", {}) is True
    assert matches("$.study", {}) is False


# --- predicates --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('$.tags ? (@ == "final")', True),  # lax: a filter on an array tests its elements
        ('$ ? (@.tags == "final")', True),  # lax: comparison operands are unwrapped
        ("$.grid ? (@ == 3)", True),  # the filter tests [1, 2] and [3]; the operand [3] unwraps to 3
        ("$ ? (@.grid == 3)", False),  # ... but unwrapping goes one level deep only
        ("$.grid[*][*] ? (@ == 3)", True),
        ("$.count ? (@ == 10.0)", True),
        ("$.count ? (@ == -10 || @ > -1)", True),
        ("$.score ? (@ < 1e0)", True),
        ('$.score ? (@ == "0.8")', False),  # different types: unknown, never true
        ('$.score ? (!(@ == "0.8"))', False),  # ... and !unknown is unknown
        ('$.score ? (@ != "0.8")', False),
        ("$.nothing ? (@ == null)", True),
        ("$.nothing ? (@ != 1)", True),  # null != non-null is true
        ("$.nothing ? (@ < 1)", False),
        ("$.flag ? (@ == true)", True),
        ("$.flag ? (@ > false)", True),
        ('$.study ? (@ > "a" && @ < "i")', True),  # strings by code point
        ('$.study ? (@ < "Z")', False),
        ("$.a ? (@ == 1)", False),  # an object compares with nothing
        ("$.a ? (exists(@.b))", True),
        ("$.a ? (exists(@.zzz))", False),
        ("$ ? (!exists(@.zzz))", True),
        ('$.a ? (@.b == 1) ? (@.d == "x")', True),
        ("$.items[*] ? (@.k > 1).k", True),
        ("$.items[*] ? (@.k > 2).k", False),
        ("$ ? (@.count == $.count)", True),
        ('$ ? (@.a.b == 1 && (@.a.c == 1 || @.a.d == "x"))', True),
        ('$ ? (@.a.b == 1 && (@.a.c == 1 || @.a.d == "y"))', False),
        ("$.a ? (@.b <> 2)", True),
        ('$.name ? (@ like_regex "^slide")', False),
        ('$.name ? (@ like_regex "^slide" flag "i")', True),
        ('$.name ? (@ like_regex "-A.svs" flag "q")', True),
        ('$.name ? (@ like_regex "A.svsx" flag "q")', False),
        ('$.name ? (@ like_regex "[[:digit:]]")', False),
        ('$.sdk.version ? (@ like_regex "^[[:digit:]]+\\\\.6")', True),
        ('$.count ? (@ like_regex "1")', False),  # like_regex on a number: unknown
        ('$.name ? (@ starts with "Slide")', True),
        ('$.name ? (@ starts with "slide")', False),
        ('$.study ? (@ == "\\u0068igh")', True),
    ],
)
def test_predicates_follow_postgres_lax_semantics(text: str, expected: bool) -> None:
    assert matches(text) is expected


def test_unicode_and_escapes_in_strings() -> None:
    doc = {"u": "café", "q": 'say "hi"', "p": "a\\b", "e": "\U0001f600"}
    assert matches('$.u ? (@ == "caf\\u00e9")', doc)
    assert matches('$.u ? (@ == "caf\\u{e9}")', doc)
    assert matches('$.q ? (@ == "say \\"hi\\"")', doc)
    assert matches('$.p ? (@ == "a\\\\b")', doc)
    assert matches('$.e ? (@ == "\\uD83D\\uDE00")', doc)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("$.a == 1", 5, "predicate at the top level"),
        ("strict $.a", 1, "strict mode is not supported"),
        ("$.a ? (@ = 1)", 10, "use =="),
        ("$.a ? (@ == 'x')", 13, "double quotes"),
        ("$.a ? (@ == high)", 13, "strings must be in double quotes"),
        ("$.a.size()", 5, "item methods"),
        ("$.a-b", 4, "arithmetic is not supported"),
        ("$.a ? (@ + 1 > 2)", 10, "arithmetic is not supported"),
        ("$.**", 4, ".** (any level) is not supported"),
        ("$.a[last]", 5, "'last'"),
        ("$.a[1 to 2]", 7, "ranges"),
        ("$.a[-1]", 5, "negative"),
        ("$var", 1, "variables"),
        ("$.a ? (@ is unknown)", 10, "is unknown"),
        ("", 1, "empty"),
        ("$.a ? (@.b)", 11, "expected a comparison"),
        ('$.a ? (@ like_regex "(")', 21, "invalid regular expression"),
        ('$.a ? (@ like_regex "a" flag "x")', 30, "unknown like_regex flag 'x'"),
        ("$.a ? (@ like_regex x)", 21, "double-quoted pattern"),
        ("@.a", 1, "only allowed inside a filter"),
        ("$.a ? (", 8, "expected a value"),
        ("$.a ? (@ == 1", 14, "')' to close the filter"),
        ('$.a ? (@ == "open)', 13, "unterminated string"),
        ("$.a ? (!@.b == 1)", 9, "parenthesised predicate"),
        ("$.a & $.b", 5, "use && for and"),
        ("$.a | $.b", 5, "use || for or"),
        ("exists($.a)", 1, "exists(...) is a predicate"),
        ("$.a $.b", 5, "unexpected '$'"),
        ("$.a ? @ == 1", 7, "'(' after '?'"),
        ("$.2024", 3, "must be quoted"),
        ("$.", 3, "expected a field name"),
        ("$.a[", 5, "expected an array index"),
        ("$.a ? (@ == 1) && $.b", 16, "predicate at the top level"),
        ("$ ? " + "(" * 60 + "@ == 1" + ")" * 60, 38, "nested more than"),
        ('$.a ? (@ == "\\u12")', 14, "four hex digits"),
    ],
)
def test_unparsable_filters_name_what_and_where(text: str, position: int, fragment: str) -> None:
    with pytest.raises(MetadataFilterError) as caught:
        parse_metadata_filter(text)
    error = caught.value
    assert fragment in error.message
    assert error.position == position
    assert f"at character {position}" in error.message
    detail = error.detail()
    assert detail["loc"] == ["query", "custom_metadata"]
    assert detail["ctx"] == {"position": position}
    assert detail["input"] == text


def test_a_filter_error_is_a_list_query_error_so_it_becomes_a_422() -> None:
    with pytest.raises(ListQueryError):
        parse_metadata_filter("$.a ==")


def test_length_limit() -> None:
    at_limit = "$." + "a" * (MAX_FILTER_LENGTH - 2)
    assert parse_metadata_filter(at_limit).matches({"a" * (MAX_FILTER_LENGTH - 2): 1})
    with pytest.raises(MetadataFilterError) as caught:
        parse_metadata_filter(at_limit + "a")
    assert f"at most {MAX_FILTER_LENGTH}" in caught.value.message
    assert caught.value.position is None


def test_whitespace_anywhere_between_tokens() -> None:
    assert matches('\t$ . study ?\n( @ ==\t"high" )  ')
    assert matches("  study")


# --- a like_regex that backtracks exponentially ---------------------------------------------------

# "^(a|aa)+$" against "aaa…ab" tries every way to split the a's into ones and twos: a Fibonacci
# number of paths, about 1.6^n (n = 40: hours).
CATASTROPHIC = '$.name ? (@ like_regex "^(a|aa)+$")'


def test_catastrophic_pattern_is_stopped_with_a_422_naming_the_pattern() -> None:
    metadata_filter = parse_metadata_filter(CATASTROPHIC, regex_budget_s=0.2)
    with pytest.raises(MetadataFilterError) as caught:
        metadata_filter.matches({"name": "a" * 40 + "b"})
    error = caught.value
    assert isinstance(error, ListQueryError)  # so the caller gets a 422, not a Lambda timeout
    assert error.position == CATASTROPHIC.index('"^') + 1
    assert "needed more than 0.2 s" in error.message
    assert "simplify it" in error.message
    assert error.detail()["type"] == "jsonpath_regex_timeout"


def test_regex_budget_is_shared_by_every_record_of_the_list() -> None:
    # Each record alone fits in the budget; together they do not. A list request gets one budget,
    # so a slow pattern cannot run for the budget once per record.
    metadata_filter = parse_metadata_filter(CATASTROPHIC, regex_budget_s=0.3)
    records = [{"name": "a" * 18 + "b"} for _ in range(10_000)]  # about 1 ms each
    with pytest.raises(MetadataFilterError, match=r"needed more than 0\.3 s"):
        for record in records:
            metadata_filter.matches(record)


def test_ordinary_patterns_are_untouched_by_the_budget() -> None:
    metadata_filter = parse_metadata_filter('$.name ? (@ like_regex "^slide-[[:digit:]]+$" flag "i")')
    names = [f"Slide-{i}" for i in range(20_000)]
    assert sum(metadata_filter.matches({"name": name}) for name in names) == 20_000
