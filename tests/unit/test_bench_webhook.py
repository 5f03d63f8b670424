"""bench.webhook with a handful of requests: the machinery runs, its rows are well formed, and the
FastAPI baseline answers what the api handler answers (no timings are asserted)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from moto import mock_aws

from bench import BenchRow
from bench import webhook as bench_webhook
from bench.webhook import (
    APPS,
    OURS_TRACED,
    SCENARIOS,
    SECTRA_KEY,
    TECHCYTE_KEY,
    Baseline,
    Ours,
    Reply,
    WebhookReport,
    percentile,
    sectra_create,
    techcyte_webhook,
)
from lambdas.api import deps


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_the_machinery_runs_and_gives_well_formed_rows() -> None:
    report = bench_webhook.run(requests=2, warmup=1, import_runs=1, cold_runs=1, isolate=False)

    assert isinstance(report, WebhookReport)
    for app in APPS:
        for scenario in SCENARIOS:
            samples = report.of(app, scenario)
            assert len(samples) == 2
            for sample in samples:
                assert 0 < sample.ours_ns <= sample.total_ns
                assert sample.aws_calls > 0 and sample.aws_ns > 0  # moto's side was timed and taken out
        # A new create calls Sectra (slide info, list, post); a repeated one answers from the table.
        assert {s.sectra_calls for s in report.of(app, "sectra create")} == {3}
        assert {s.sectra_calls for s in report.of(app, "sectra create again")} == {0}
        assert {s.sectra_calls for s in report.of(app, "techcyte webhook")} == {0}
    assert set(report.imports_ms) == {"baseline", "ours", OURS_TRACED}
    assert {(c.app, c.request) for c in report.cold} == {
        ("baseline", "techcyte webhook"),
        ("ours", "techcyte webhook"),
        ("ours", "platform GET"),
        (OURS_TRACED, "techcyte webhook"),
    }

    rows = report.rows()
    assert len(rows) == 2 + len(SCENARIOS)
    assert len({row.stage for row in rows}) == len(rows)
    for row in rows:
        assert isinstance(row, BenchRow)
        assert row.stage.startswith("webhook: ")
        assert row.unit == "ms"
        assert not row.higher_is_better
        assert math.isfinite(row.baseline) and row.baseline > 0
        assert math.isfinite(row.ours) and row.ours > 0
        assert row.ratio == pytest.approx(row.baseline / row.ours)


# --- both apps answer alike ----------------------------------------------------------------------


@pytest.fixture
def apps() -> Iterator[tuple[Baseline, Ours, str]]:
    with (
        bench_webhook.environment(bench_webhook.bench_environment()),
        mock_aws(config={"batch": {"use_docker": False}}),
        bench_webhook.sectra_stand_in(isolate=False) as sectra_url,
    ):
        bench_webhook.provision()
        deps.reset()
        baseline = Baseline()
        try:
            yield baseline, Ours(), sectra_url
        finally:
            baseline.close()
            deps.reset()


def _post(app: Baseline | Ours, path: str, body: Any = None, raw: bytes | None = None) -> Reply:
    return app.call("POST", path, raw if raw is not None else json.dumps(body).encode())


def _without(answer: Any, *keys: str) -> Any:
    return {k: v for k, v in answer.items() if k not in keys}


SECTRA = f"/hooks/sectra/{SECTRA_KEY}"
TECHCYTE = f"/hooks/techcyte/{TECHCYTE_KEY}"


def test_sectra_create_and_its_repetition_answer_alike(apps: tuple[Baseline, Ours, str]) -> None:
    baseline, ours, sectra_url = apps
    replies = {}
    for app in (baseline, ours):
        body = sectra_create(sectra_url, f"alike-{app.name}")
        first, again = _post(app, SECTRA, body), _post(app, SECTRA, body)
        assert (first.status, again.status) == (200, 200)
        assert again.body == first.body  # the stored placeholder, not a second one
        assert first.headers["x-sectra-apiversion"] == "1.5"
        replies[app.name] = first.body
    # The same placeholder apart from what identifies it (slide, result id and version).
    assert _without(replies["baseline"], "slideId", "id", "versionId") == _without(
        replies["ours"], "slideId", "id", "versionId"
    )
    assert replies["ours"]["displayResult"] == "Analysis queued"


def test_techcyte_webhook_and_its_repetition_answer_alike(apps: tuple[Baseline, Ours, str]) -> None:
    baseline, ours, _ = apps
    for task, app in enumerate((baseline, ours), start=77):
        first, again = _post(app, TECHCYTE, techcyte_webhook(task)), _post(app, TECHCYTE, techcyte_webhook(task))
        assert (first.status, again.status) == (200, 200)
        assert first.body["message"] == "accepted"
        assert again.body == first.body  # the same run, started once


@pytest.mark.parametrize(
    ("path", "body"),
    [
        # A wrong key: 404 in the vendor's error shape, before the body is looked at.
        (f"/hooks/sectra/wrong-{SECTRA_KEY}", {"action": "create"}),
        (f"/hooks/techcyte/wrong-{TECHCYTE_KEY}", {"task_id": "1"}),
        # A field missing or malformed: 422 naming it.
        (SECTRA, {"action": "create", "applicationId": "he-tissue", "slideId": "s"}),
        (SECTRA, {"action": "shred", "applicationId": "he-tissue", "slideId": "s", "callbackInfo": {"url": "x"}}),
        (TECHCYTE, {"task_id": "42", "scans": {}}),
        (TECHCYTE, {"scans": {"1": "https://bucket.s3.us-west-2.amazonaws.com/a.svs"}}),
        # A URL outside the allowlists: 403, nothing stored.
        (TECHCYTE, {"task_id": "43", "scans": {"1": "https://evil.example/a.svs"}}),
    ],
)
def test_refusals_answer_alike(apps: tuple[Baseline, Ours, str], path: str, body: Any) -> None:
    baseline, ours, _ = apps
    expected = _post(ours, path, body)
    got = _post(baseline, path, body)
    assert expected.status in (403, 404, 422)
    assert (got.status, got.body) == (expected.status, expected.body)


def test_sectra_callback_outside_the_allowlist_is_refused_alike(apps: tuple[Baseline, Ours, str]) -> None:
    baseline, ours, _ = apps
    body = sectra_create("https://pacs.evil.example/ia", "evil")
    expected, got = _post(ours, SECTRA, body), _post(baseline, SECTRA, body)
    assert expected.status == 403
    assert (got.status, got.body) == (expected.status, expected.body)


def test_a_body_that_is_not_json_is_refused_alike(apps: tuple[Baseline, Ours, str]) -> None:
    baseline, ours, _ = apps
    for path, status in ((TECHCYTE, 400), (SECTRA, 422)):
        expected, got = _post(ours, path, raw=b"{not json"), _post(baseline, path, raw=b"{not json")
        # Only the wording of the JSON parser's complaint differs.
        assert (expected.status, got.status) == (status, status)
