"""TechcyteClient against the fake Techcyte API: tokens, retries, exactly-once results, errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from slidebridge.errors import RetryableError, UrlNotAllowedError
from slidebridge.outbound import OutboundPolicy, Purpose
from slidebridge.vendors.techcyte import (
    ResultsPayload,
    TechcyteAuthError,
    TechcyteClient,
    TechcyteOutcomeUnknownError,
    TechcyteRejectedError,
    TechcyteUnavailableError,
    failed_scan_result,
    scan_result,
)
from tests.analyses import make_analysis
from tests.fakes.techcyte import FakeTask, FakeTechcyte

POLICY = OutboundPolicy({Purpose.TECHCYTE_API: ["127.0.0.1"]})


@pytest.fixture
def fake() -> Iterator[FakeTechcyte]:
    with FakeTechcyte() as server:
        yield server


@pytest.fixture
def task(fake: FakeTechcyte) -> FakeTask:
    return fake.add_task({"5550001": [b"a"], "5550002": [b"b"]})


def client(fake: FakeTechcyte, *, task: FakeTask | None = None, creds: bool = True, **kwargs) -> TechcyteClient:
    return TechcyteClient(
        fake.base_url,
        policy=POLICY,
        task_token=task.jwt if task is not None else None,
        client_id=fake.client_id if creds else None,
        client_secret=fake.client_secret if creds else None,
        backoff_s=0,
        timeout_s=kwargs.pop("timeout_s", 5.0),
        **kwargs,
    )


def payload(run_id: str | None = "run-1", scans: tuple[str, ...] = ("5550001", "5550002")) -> ResultsPayload:
    results = [scan_result(make_analysis(), scans[0], model_name="m", provider="p", min_tissue_mm2=0, run_id=run_id)]
    results += [
        failed_scan_result(s, "unreadable slide", model_name="m", provider="p", run_id=run_id) for s in scans[1:]
    ]
    return ResultsPayload(scanResults=results)


def test_the_task_jwt_is_used_when_present(fake: FakeTechcyte, task: FakeTask):
    with client(fake, task=task) as tc:
        tc.post_results(task.task_id, payload())
    assert fake.token_requests == []  # no exchange needed
    assert [e["sample_id"] for e in fake.evaluations_of(task)] == [5550001, 5550002]
    assert fake.requests[-1][2]["authorization"] == f"Bearer {task.jwt}"
    # the fake accepted exactly what the builders produce (all server rules)
    assert fake.rejected == []


@pytest.mark.parametrize("style", ["basic", "form"])
def test_client_credentials_without_a_jwt(fake: FakeTechcyte, task: FakeTask, style: str):
    with client(fake, auth_style=style) as tc:
        tc.post_results(task.task_id, payload())
    assert fake.token_requests == [style]
    assert len(fake.evaluations_of(task)) == 2


def test_a_401_fetches_a_new_token_once(fake: FakeTechcyte, task: FakeTask):
    fake.fail_next("results", 401)
    with client(fake, task=task) as tc:
        tc.post_results(task.task_id, payload())
    assert fake.token_requests == ["basic"]
    assert len(fake.evaluations_of(task)) == 2
    # an expired client token is replaced on a GET too
    with client(fake) as tc:
        tc.get_case_evaluations(task.task_id)
        fake.revoke_tokens()
        assert len(tc.get_case_evaluations(task.task_id)) == 2
    assert fake.token_requests == ["basic", "basic", "basic"]


def test_a_401_without_credentials_or_twice_is_an_auth_error(fake: FakeTechcyte, task: FakeTask):
    fake.fail_next("results", 401)
    with client(fake, task=task, creds=False) as tc, pytest.raises(TechcyteAuthError):
        tc.post_results(task.task_id, payload())
    fake.fail_next("case_evaluations", 401, times=2)
    with client(fake, task=task) as tc, pytest.raises(TechcyteAuthError):
        tc.get_case_evaluations(task.task_id)
    assert fake.evaluations == []


def test_wrong_client_secret_is_an_auth_error_that_does_not_leak_it(fake: FakeTechcyte, task: FakeTask):
    tc = TechcyteClient(fake.base_url, policy=POLICY, client_id="fake-client", client_secret="s3cr3t-value")
    with tc, pytest.raises(TechcyteAuthError) as info:
        tc.post_results(task.task_id, payload())
    assert "s3cr3t" not in str(info.value)


def test_5xx_and_429_are_retried_on_reads(fake: FakeTechcyte, task: FakeTask):
    fake.fail_next("case_evaluations", 503)
    fake.fail_next("case_evaluations", 429)
    with client(fake, task=task) as tc:
        assert tc.get_case_evaluations(task.task_id) == []
    fake.fail_next("case_evaluations", 500, times=4)
    with client(fake, task=task, retries=3) as tc, pytest.raises(TechcyteUnavailableError) as info:
        tc.get_case_evaluations(task.task_id)
    assert isinstance(info.value, RetryableError)


def test_a_5xx_post_that_stored_nothing_is_sent_again_once(fake: FakeTechcyte, task: FakeTask):
    fake.fail_next("results", 503)
    with client(fake, task=task) as tc:
        tc.post_results(task.task_id, payload())
    assert len(fake.posts) == 1 and len(fake.evaluations_of(task)) == 2


def test_a_post_answered_never_after_storing_is_not_duplicated(fake: FakeTechcyte, task: FakeTask):
    fake.fail_next("results", "drop_after_store")
    with client(fake, task=task) as tc:
        tc.post_results(task.task_id, payload())
    assert len(fake.posts) == 1  # found by its run marker in case_evaluations, not posted again


def test_a_post_that_times_out_after_storing_is_not_duplicated(fake: FakeTechcyte, task: FakeTask):
    fake.fail_next("results", "delay_after_store", delay_s=1.0)
    with client(fake, task=task, timeout_s=0.3) as tc:
        tc.post_results(task.task_id, payload())
    assert len(fake.posts) == 1


def test_without_a_run_marker_an_ambiguous_post_is_not_retried(fake: FakeTechcyte, task: FakeTask):
    fake.fail_next("results", "drop_after_store")
    with client(fake, task=task) as tc, pytest.raises(TechcyteOutcomeUnknownError):
        tc.post_results(task.task_id, payload(run_id=None))
    assert len(fake.posts) == 1


def test_other_tasks_evaluations_with_our_marker_do_not_count(fake: FakeTechcyte, task: FakeTask):
    fake.add_evaluation(
        task_number=1, case_number=task.case_number, sample_id=5550001, report={"slidebridge_run": "run-1"}
    )
    with client(fake, task=task) as tc:
        assert tc.find_posted(task.task_id, "run-1") == []


def test_a_rejected_post_says_why_and_is_not_retried(fake: FakeTechcyte, task: FakeTask, caplog):
    bad = fake.add_task({"1": [b"x"]}, regions={"1": 0})
    caplog.set_level(logging.DEBUG)
    with client(fake, task=bad) as tc, pytest.raises(TechcyteRejectedError) as info:
        tc.post_results(bad.task_id, payload(scans=("1",)))
    assert info.value.status == 400 and "exactly one image region" in info.value.message
    assert len(fake.rejected) == 1
    assert bad.jwt not in caplog.text and fake.client_secret not in caplog.text


def test_connection_errors_are_retried_then_unavailable():
    with FakeTechcyte() as gone:
        url = gone.base_url
    tc = TechcyteClient(url, policy=POLICY, task_token="eyJx.y.z", retries=2, backoff_s=0, timeout_s=1)
    with tc, pytest.raises(TechcyteUnavailableError, match="after 3 attempts"):
        tc.post_results("dGFzazox", payload(scans=("1",)))


def test_triage_patch(fake: FakeTechcyte, task: FakeTask):
    with client(fake, task=task) as tc:
        tc.patch_triage(task.task_id, category="review", score=0.75)
        tc.patch_triage(task.task_id)  # nothing to set: no call
    assert fake.triage[task.case_number] == {"triage_category": "review", "triage_score": 0.75}
    assert sum(1 for method, _, _ in fake.requests if method == "PATCH") == 1


def test_the_api_url_goes_through_the_outbound_policy():
    with pytest.raises(UrlNotAllowedError):
        TechcyteClient("https://evil.example/api/v3", policy=POLICY, task_token="t")
    with pytest.raises(ValueError, match="task token or a client id"):
        TechcyteClient("http://127.0.0.1:1/api/v3", policy=POLICY)
