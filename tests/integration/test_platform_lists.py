"""Platform API lists (runs, items, applications) through the real ``api`` handler, with moto for DynamoDB.

Pagination, sorting, filters, the 422s, organisation isolation, and that listing runs is a gsi1
Query, never a table Scan.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lambdas.api import deps
from lambdas.api.handler import handler
from slidebridge.applications import APPLICATIONS
from slidebridge.runs import Item, ItemState, ItemTerminationReason, Run
from slidebridge.store import RunStore
from tests.apigw import LambdaContext, api_event
from tests.integration.conftest import TABLE, TOKEN

OTHER_TOKEN = "other-org-token-0123456789"
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def api(aws: None) -> Iterator[RunStore]:
    deps.reset()
    store = RunStore(TABLE)
    store.register_api_token(TOKEN, user_id="user-1", organization_id="org-a")
    store.register_api_token(OTHER_TOKEN, user_id="user-2", organization_id="org-b")
    yield store
    deps.reset()


def call(path: str, query: dict[str, list[str]] | None = None, token: str = TOKEN) -> tuple[int, Any]:
    response = handler(api_event("GET", path, token=token, query=query), LambdaContext())  # type: ignore[arg-type]
    headers = {k.lower(): v for k, v in (response.get("headers") or {}).items()}
    for k, values in (response.get("multiValueHeaders") or {}).items():
        headers.setdefault(k.lower(), values[-1])
    assert headers["content-type"] == "application/json"
    return response["statusCode"], json.loads(response["body"])


def add_run(
    store: RunStore,
    minute: int,
    *,
    org: str = "org-a",
    application_id: str = "he-tissue",
    version: str = "1.0.0",
    metadata: dict[str, Any] | None = None,
    external_ids: tuple[str, ...] = ("slide.svs",),
    submitted_by: str = "user-1",
) -> Run:
    run = Run(
        application_id=application_id,
        version_number=version,
        organization_id=org,
        submitted_by=submitted_by,
        submitted_at=T0 + timedelta(minutes=minute),
        custom_metadata=metadata,
    )
    items = [Item(run_id=run.run_id, index=i, external_id=e) for i, e in enumerate(external_ids)]
    return store.create_run(run, items)


def run_ids(runs: list[dict[str, Any]]) -> list[str]:
    return [r["run_id"] for r in runs]


# --- runs: pages and order -----------------------------------------------------------------------


def test_runs_are_listed_newest_first_in_pages_of_the_run_read_shape(api: RunStore) -> None:
    runs = [add_run(api, minute) for minute in range(12)]
    newest_first = [r.run_id for r in reversed(runs)]

    pages = [call("/api/v1/runs", {"page": [str(p)], "page_size": ["5"]}) for p in (1, 2, 3, 4)]

    assert [status for status, _ in pages] == [200, 200, 200, 200]
    assert [run_ids(body) for _, body in pages] == [newest_first[:5], newest_first[5:10], newest_first[10:], []]
    status, single = call(f"/api/v1/runs/{runs[-1].run_id}")
    assert status == 200
    assert pages[0][1][0] == single  # the same RunReadResponse as GET /runs/{id}


def test_default_page_size_is_50_and_page_size_may_be_spelled_with_a_hyphen(api: RunStore) -> None:
    for minute in range(55):
        add_run(api, minute, external_ids=())
    assert len(call("/api/v1/runs")[1]) == 50
    assert len(call("/api/v1/runs", {"page": ["2"]})[1]) == 5
    assert len(call("/api/v1/runs", {"page-size": ["7"]})[1]) == 7


@pytest.mark.parametrize("path", ["/api/v1/runs", "/api/v1/applications", "/api/v1/runs/{run_id}/items"])
@pytest.mark.parametrize(
    ("name", "value"), [("page_size", "4"), ("page_size", "101"), ("page-size", "4"), ("page", "0")]
)
def test_page_parameters_out_of_range_are_422(api: RunStore, path: str, name: str, value: str) -> None:
    run = add_run(api, 0)
    status, body = call(path.format(run_id=run.run_id), {name: [value]})
    assert status == 422
    (error,) = body["detail"]
    assert error["loc"] == ["query", name]
    assert error["input"] == value
    assert error["msg"].startswith("Input should be")


def test_runs_sort_ascending_descending_and_leading_space(api: RunStore) -> None:
    b1 = add_run(api, 1, metadata={"rank": 2}, version="1.0.0", submitted_by="bob")
    a2 = add_run(api, 2, metadata={"rank": 1}, version="1.0.0", submitted_by="alice")
    c3 = add_run(api, 3, metadata=None, version="0.9.0", submitted_by="alice")

    def order(*sort: str) -> list[str]:
        status, body = call("/api/v1/runs", {"sort": list(sort)})
        assert status == 200, body
        return run_ids(body)

    assert order("submitted_at") == [b1.run_id, a2.run_id, c3.run_id]
    assert order("+submitted_at") == [b1.run_id, a2.run_id, c3.run_id]
    # sort=+submitted_by sent unencoded arrives as " submitted_by"; ties then by -submitted_at.
    assert order(" submitted_by", "-submitted_at") == [c3.run_id, a2.run_id, b1.run_id]
    assert order("-submitted_at") == [c3.run_id, a2.run_id, b1.run_id]
    assert order("version_number", "submitted_at") == [c3.run_id, b1.run_id, a2.run_id]
    # custom_metadata in jsonb order; runs without metadata (SQL NULL) last when ascending.
    assert order("custom_metadata") == [a2.run_id, b1.run_id, c3.run_id]
    assert order("-custom_metadata") == [c3.run_id, b1.run_id, a2.run_id]


def test_sorted_pages_are_stable_and_complete(api: RunStore) -> None:
    runs = [add_run(api, minute % 3) for minute in range(13)]  # many ties on submitted_at
    seen: list[str] = []
    for page in (1, 2, 3):
        status, body = call("/api/v1/runs", {"sort": ["submitted_at"], "page_size": ["5"], "page": [str(page)]})
        assert status == 200
        seen.extend(run_ids(body))
    assert sorted(seen) == sorted(r.run_id for r in runs)


def test_unknown_sort_field_is_422_naming_it_and_the_allowed_fields(api: RunStore) -> None:
    status, body = call("/api/v1/runs", {"sort": ["-submitted_at", "state"]})
    assert status == 422
    (error,) = body["detail"]
    assert error["loc"] == ["query", "sort", 1]
    assert "'state'" in error["msg"]
    assert "submitted_at" in error["msg"]
    assert "termination_reason" in error["msg"]


# --- runs: filters -------------------------------------------------------------------------------


def test_runs_filters(api: RunStore) -> None:
    high = add_run(api, 1, metadata={"study": "high", "score": 0.9, "tags": ["draft"]}, external_ids=("a.svs", "b.svs"))
    low = add_run(api, 2, metadata={"study": "low", "score": 0.5}, version="0.9.0", external_ids=("b.svs",))
    other_app = add_run(api, 3, application_id="other-app", metadata={"study": "high"}, external_ids=("c.svs",))
    none = add_run(api, 4, metadata=None, external_ids=("a.svs",))

    def ids(**query: str) -> set[str]:
        status, body = call("/api/v1/runs", {k: [v] for k, v in query.items()})
        assert status == 200, body
        return set(run_ids(body))

    assert ids() == {high.run_id, low.run_id, other_app.run_id, none.run_id}
    assert ids(application_id="he-tissue") == {high.run_id, low.run_id, none.run_id}
    assert ids(application_id="he-tissue", application_version="0.9.0") == {low.run_id}
    assert ids(application_version="1.0.0") == {high.run_id, other_app.run_id, none.run_id}
    assert ids(external_id="a.svs") == {high.run_id, none.run_id}
    assert ids(external_id="b.svs", application_version="1.0.0") == {high.run_id}
    assert ids(external_id="missing.svs") == set()
    assert ids(custom_metadata="$.study") == {high.run_id, low.run_id, other_app.run_id}
    assert ids(custom_metadata="study") == {high.run_id, low.run_id, other_app.run_id}
    assert ids(custom_metadata='$.study ? (@ == "high")') == {high.run_id, other_app.run_id}
    assert ids(custom_metadata="$.score ? (@ > 0.75)") == {high.run_id}
    assert ids(custom_metadata='$.tags[*] ? (@ == "draft")') == {high.run_id}
    assert ids(custom_metadata='$.study ? (@ like_regex "^h")', application_id="other-app") == {other_app.run_id}
    assert ids(submitted_by="me") == {high.run_id, low.run_id, other_app.run_id, none.run_id}


def test_runs_filter_and_sort_together_with_pages(api: RunStore) -> None:
    runs = [add_run(api, m, metadata={"i": m, "even": m % 2 == 0}) for m in range(10)]
    query = {"custom_metadata": ["$.even ? (@ == true)"], "sort": ["-custom_metadata"], "page_size": ["5"]}
    status, first = call("/api/v1/runs", {**query, "page": ["1"]})
    assert status == 200
    _, second = call("/api/v1/runs", {**query, "page": ["2"]})
    # {"i": 8, "even": true} > {"i": 6, ...}: same pair count, so pair by pair in key order ("i" first).
    assert run_ids(first) == [runs[m].run_id for m in (8, 6, 4, 2, 0)]
    assert second == []


def test_bad_custom_metadata_filter_is_422_saying_where(api: RunStore) -> None:
    status, body = call("/api/v1/runs", {"custom_metadata": ["$.study ? (@ == high)"]})
    assert status == 422
    (error,) = body["detail"]
    assert error["loc"] == ["query", "custom_metadata"]
    assert "character 17" in error["msg"]
    assert "double quotes" in error["msg"]
    assert error["ctx"] == {"position": 17}


def test_like_regex_that_backtracks_without_end_is_a_422_not_a_timeout(api: RunStore) -> None:
    # Given runs whose names a careless pattern cannot finish matching (1.6^40 ways to try)
    for minute in range(3):
        add_run(api, minute, metadata={"name": "a" * 40 + "b"})
    # When the list asks for them
    status, body = call("/api/v1/runs", {"custom_metadata": ['$.name ? (@ like_regex "^(a|aa)+$")']})
    # Then the caller learns which part to change, within the filter's matching budget
    assert status == 422
    (error,) = body["detail"]
    assert error["type"] == "jsonpath_regex_timeout"
    assert error["loc"] == ["query", "custom_metadata"]
    assert error["msg"].startswith("custom_metadata filter too slow at character 24")
    assert "like_regex pattern needed more than 2 s" in error["msg"] and "simplify it" in error["msg"]


def test_runs_of_other_organisations_are_invisible(api: RunStore) -> None:
    mine = add_run(api, 1, metadata={"study": "x"})
    theirs = add_run(api, 2, org="org-b", metadata={"study": "x"}, submitted_by="user-2")
    assert run_ids(call("/api/v1/runs")[1]) == [mine.run_id]
    assert run_ids(call("/api/v1/runs", token=OTHER_TOKEN)[1]) == [theirs.run_id]
    assert run_ids(call("/api/v1/runs", {"custom_metadata": ["$.study"]}, token=OTHER_TOKEN)[1]) == [theirs.run_id]
    assert run_ids(call("/api/v1/runs", {"external_id": ["slide.svs"]}, token=OTHER_TOKEN)[1]) == [theirs.run_id]
    assert call("/api/v1/runs", {"for_organization": ["org-a"]}, token=OTHER_TOKEN)[0] == 404
    assert run_ids(call("/api/v1/runs", {"for_organization": ["org-a"]})[1]) == [mine.run_id]
    assert call("/api/v1/runs", token="wrong")[0] == 401


def test_listing_many_runs_queries_gsi1_and_never_scans(api: RunStore) -> None:
    # 2000 runs (and a neighbour organisation's 30) written in batches: moto's transactions are slow.
    records = [
        api._run_record(
            Run(
                application_id="he-tissue",
                version_number="1.0.0",
                organization_id=org,
                submitted_by="user-1",
                submitted_at=T0 + timedelta(seconds=i),
                custom_metadata={"i": i},
            )
        )
        for org, count in (("org-a", 2000), ("org-b", 30))
        for i in range(count)
    ]
    for start in range(0, len(records), 25):
        batch = [{"PutRequest": {"Item": record}} for record in records[start : start + 25]]
        api.client.batch_write_item(RequestItems={TABLE: batch})
    operations: list[str] = []
    read: list[int] = []  # runs read from the index, per list call
    events = deps.run_store().client.meta.events
    events.register("before-call.dynamodb", lambda model, **_: operations.append(model.name))
    events.register("after-call.dynamodb.Query", lambda parsed, **_: read.append(read.pop() + parsed["ScannedCount"]))

    def listed(query: dict[str, list[str]]) -> tuple[list[int], int]:
        read.append(0)
        status, runs = call("/api/v1/runs", query)
        assert status == 200, runs
        return [r["custom_metadata"]["i"] for r in runs], read[-1]

    page, runs_read = listed({"page_size": ["5"]})
    assert page == [1999, 1998, 1997, 1996, 1995]
    # The default order is the index's: reading the page's five runs is enough.
    assert runs_read == 5

    # The SDK always sorts by -submitted_at: the index's order too, so it reads little more than its page.
    page, runs_read = listed({"page_size": ["5"], "sort": ["-submitted_at"]})
    assert page == [1999, 1998, 1997, 1996, 1995]
    assert runs_read < 20
    page, runs_read = listed({"page_size": ["100"], "page": ["3"], "sort": ["submitted_at", "-custom_metadata"]})
    assert page == list(range(200, 300))
    assert runs_read < 1000

    # A sort the index cannot give reads the organisation's runs, all of them but no more.
    page, runs_read = listed({"page_size": ["5"], "sort": ["-custom_metadata"]})
    assert page == [1999, 1998, 1997, 1996, 1995]
    assert runs_read == 2000

    status, last = call("/api/v1/runs", {"page_size": ["100"], "page": ["20"]})
    assert status == 200
    assert [r["custom_metadata"]["i"] for r in last] == list(range(99, -1, -1))

    status, sorted_page = call("/api/v1/runs", {"sort": ["submitted_at"], "page_size": ["100"], "page": ["3"]})
    assert status == 200
    assert [r["custom_metadata"]["i"] for r in sorted_page] == list(range(200, 300))

    status, filtered = call("/api/v1/runs", {"custom_metadata": ["$.i ? (@ >= 1990)"], "page_size": ["100"]})
    assert [r["custom_metadata"]["i"] for r in filtered] == list(range(1999, 1989, -1))

    assert "Scan" not in operations
    assert set(operations) <= {"GetItem", "Query"}


# --- items ---------------------------------------------------------------------------------------


@pytest.fixture
def run_with_items(api: RunStore) -> tuple[Run, list[Item]]:
    run = Run(application_id="he-tissue", version_number="1.0.0", organization_id="org-a", submitted_by="user-1")
    metadata: list[dict[str, Any] | None] = [
        {"priority": "high", "score": 0.99},
        {"priority": "low", "score": 0.5},
        None,
        {"priority": "high", "score": 0.7, "flags": ["reviewed"]},
        {"priority": "low"},
        {"priority": "high"},
    ]
    items = [
        Item(run_id=run.run_id, index=i, external_id=f"slide_{i:02d}.svs", custom_metadata=m)
        for i, m in enumerate(metadata)
    ]
    api.create_run(run, items)
    api.transition_item(run.run_id, 0, ItemState.PROCESSING)
    api.transition_item(run.run_id, 1, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED)
    api.transition_item(run.run_id, 2, ItemState.TERMINATED, reason=ItemTerminationReason.USER_ERROR)
    api.transition_item(run.run_id, 3, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED)
    return run, api.list_items(run.run_id)


def external_ids(items: list[dict[str, Any]]) -> list[str]:
    return [i["external_id"] for i in items]


def test_items_filters(run_with_items: tuple[Run, list[Item]]) -> None:
    run, items = run_with_items
    path = f"/api/v1/runs/{run.run_id}/items"

    def found(query: dict[str, list[str]]) -> list[str]:
        status, body = call(path, query)
        assert status == 200, body
        return external_ids(body)

    assert found({}) == [f"slide_{i:02d}.svs" for i in range(6)]  # submission order by default
    assert found({"item_id__in": [items[4].item_id, items[1].item_id]}) == ["slide_01.svs", "slide_04.svs"]
    assert found({"item_id__in": [f"{items[0].item_id},{items[5].item_id.upper()}"]}) == [
        "slide_00.svs",
        "slide_05.svs",
    ]
    assert found({"external_id__in": ["slide_02.svs", "slide_03.svs,slide_05.svs"]}) == [
        "slide_02.svs",
        "slide_03.svs",
        "slide_05.svs",
    ]
    assert found({"state": ["TERMINATED"]}) == ["slide_01.svs", "slide_02.svs", "slide_03.svs"]
    assert found({"state": ["PROCESSING"]}) == ["slide_00.svs"]
    assert found({"termination_reason": ["SUCCEEDED"]}) == ["slide_01.svs", "slide_03.svs"]
    assert found({"termination_reason": ["USER_ERROR"], "state": ["TERMINATED"]}) == ["slide_02.svs"]
    assert found({"custom_metadata": ['$.priority ? (@ == "high")']}) == [
        "slide_00.svs",
        "slide_03.svs",
        "slide_05.svs",
    ]
    assert found({"custom_metadata": ["$.score ? (@ > 0.6)"]}) == ["slide_00.svs", "slide_03.svs"]
    assert found({"custom_metadata": ['$.flags[*] ? (@ == "reviewed")']}) == ["slide_03.svs"]
    assert found({"custom_metadata": ['$.priority ? (@ == "high")'], "state": ["PENDING"]}) == ["slide_05.svs"]
    assert found({"external_id__in": ["nothing.svs"]}) == []


def test_items_sort_and_pages(run_with_items: tuple[Run, list[Item]]) -> None:
    run, _ = run_with_items
    path = f"/api/v1/runs/{run.run_id}/items"
    status, body = call(path, {"sort": ["-external_id"], "page_size": ["5"]})
    assert status == 200
    assert external_ids(body) == [f"slide_{i:02d}.svs" for i in (5, 4, 3, 2, 1)]
    assert external_ids(call(path, {"sort": ["-external_id"], "page_size": ["5"], "page": ["2"]})[1]) == [
        "slide_00.svs"
    ]
    assert call(path, {"sort": ["-external_id"], "page_size": ["5"], "page": ["3"]}) == (200, [])
    # NULLs (open items) last ascending; ties keep submission order.
    by_reason = call(path, {"sort": [" termination_reason"]})[1]
    assert external_ids(by_reason) == [f"slide_{i:02d}.svs" for i in (1, 3, 2, 0, 4, 5)]
    by_metadata = call(path, {"sort": ["custom_metadata", "-external_id"]})[1]
    # jsonb order (as PostgreSQL sorts these): 1-pair objects, then 2-pair ones compared on "score" first
    # (shorter keys come first in storage order), then the 3-pair one; NULL metadata last.
    assert external_ids(by_metadata) == [f"slide_{i:02d}.svs" for i in (5, 4, 1, 0, 3, 2)]


@pytest.mark.parametrize(
    ("query", "loc"),
    [
        ({"state": ["DONE"]}, ["query", "state"]),
        ({"termination_reason": ["FAILED"]}, ["query", "termination_reason"]),
        ({"sort": ["state"]}, ["query", "sort", 0]),
        ({"sort": ["submitted_at"]}, ["query", "sort", 0]),
        ({"custom_metadata": ["$.a ? (@ == 1"]}, ["query", "custom_metadata"]),
    ],
)
def test_items_bad_parameters_are_422(
    run_with_items: tuple[Run, list[Item]], query: dict[str, list[str]], loc: list[Any]
) -> None:
    run, _ = run_with_items
    status, body = call(f"/api/v1/runs/{run.run_id}/items", query)
    assert status == 422
    assert body["detail"][0]["loc"] == loc


def test_items_of_another_organisations_run_are_404_whatever_the_filters(
    run_with_items: tuple[Run, list[Item]],
) -> None:
    run, _ = run_with_items
    status, _ = call(f"/api/v1/runs/{run.run_id}/items", {"state": ["TERMINATED"]}, token=OTHER_TOKEN)
    assert status == 404


# --- applications --------------------------------------------------------------------------------


@pytest.fixture
def three_applications(api: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    base = APPLICATIONS["he-tissue"]
    for app_id, name, classes in (("a-app", "Zeta", ["RUO"]), ("z-app", "Alpha", ["IVDR", "RUO"])):
        monkeypatch.setitem(
            APPLICATIONS,
            app_id,
            base.model_copy(update={"application_id": app_id, "name": name, "regulatory_classes": classes}),
        )


def application_ids(apps: list[dict[str, Any]]) -> list[str]:
    return [a["application_id"] for a in apps]


def test_applications_sort_and_pages(three_applications: None) -> None:
    assert application_ids(call("/api/v1/applications")[1]) == ["a-app", "he-tissue", "z-app"]
    assert application_ids(call("/api/v1/applications", {"sort": ["-application_id"]})[1]) == [
        "z-app",
        "he-tissue",
        "a-app",
    ]
    assert application_ids(call("/api/v1/applications", {"sort": [" name"]})[1]) == ["z-app", "he-tissue", "a-app"]
    assert application_ids(call("/api/v1/applications", {"sort": ["-regulatory_classes", "name"]})[1]) == [
        "he-tissue",
        "a-app",
        "z-app",
    ]
    assert application_ids(call("/api/v1/applications", {"page-size": ["5"], "page": ["1"]})[1]) == [
        "a-app",
        "he-tissue",
        "z-app",
    ]
    assert call("/api/v1/applications", {"page-size": ["5"], "page": ["2"]}) == (200, [])
    assert call("/api/v1/applications", {"page_size": ["5"], "page": ["2"]}) == (200, [])
    status, body = call("/api/v1/applications", {"sort": ["version"]})
    assert status == 422
    assert "regulatory_classes" in body["detail"][0]["msg"]
