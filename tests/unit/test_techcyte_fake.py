"""The fake Techcyte API enforces the fact sheet's server rules (so client tests mean something)."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest

from tests.fakes.techcyte import FakeTask, FakeTechcyte, global_id


@pytest.fixture
def fake() -> Iterator[FakeTechcyte]:
    with FakeTechcyte() as server:
        yield server


@pytest.fixture
def task(fake: FakeTechcyte) -> FakeTask:
    return fake.add_task({"5550001": [b"II*\x00" + bytes(range(200))], "5550002": [b"x"]}, regions={"5550002": 2})


def good_scan(scan_id: str = "5550001") -> dict:
    return {
        "scanId": scan_id,
        "results": {"summary": "ok", "external_url": "https://viewer.example/r/1", "n": 1},
        "workflow": {
            "model_name": "m",
            "provider": "p",
            "ruo": True,
            "report": {"type": "Basic", "results": [{"name": "a", "result": "b"}], "segments": []},
        },
        "geojson": {
            "type": "FeatureCollection",
            "features": [
                {
                    "type": "Feature",
                    "bbox": [0, 0, 1, 1],
                    "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
                    "properties": {"annotation_type": "tissue"},
                }
            ],
        },
        "qcFailReasons": [],
    }


def post(fake: FakeTechcyte, task: FakeTask, body: dict, *, token: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{fake.base_url}/external/results/{task.task_id}",
        json=body,
        headers={"Authorization": f"Bearer {token or task.jwt}"},
    )


def test_token_by_basic_auth_and_by_form(fake: FakeTechcyte):
    basic = httpx.post(
        f"{fake.base_url}/token", data={"grant_type": "client_credentials"}, auth=(fake.client_id, fake.client_secret)
    )
    form = httpx.post(
        f"{fake.base_url}/token",
        data={"grant_type": "client_credentials", "client_id": fake.client_id, "client_secret": fake.client_secret},
    )
    assert basic.status_code == form.status_code == 200
    assert set(basic.json()) == {"access_token"}
    assert fake.token_requests == ["basic", "form"]
    wrong = httpx.post(f"{fake.base_url}/token", data={"grant_type": "client_credentials"}, auth=("x", "y"))
    assert wrong.status_code == 401
    no_grant = httpx.post(f"{fake.base_url}/token", data={}, auth=(fake.client_id, fake.client_secret))
    assert no_grant.status_code == 400


def test_results_are_stored_per_scan_with_integer_ids_and_report_minus_url(fake: FakeTechcyte, task: FakeTask):
    response = post(fake, task, {"scanResults": [good_scan()]})
    assert response.status_code == 201 and response.content == b""
    (evaluation,) = fake.evaluations_of(task)
    assert evaluation["task_id"] == task.number and evaluation["sample_id"] == 5550001
    assert evaluation["details"] == {"external_url": "https://viewer.example/r/1", "report": {"summary": "ok", "n": 1}}
    assert task.scans["5550001"].complete
    # append, not upsert
    assert post(fake, task, {"scanResults": [good_scan()]}).status_code == 201
    assert len(fake.evaluations_of(task)) == 2


def test_plain_integer_task_id_is_accepted(fake: FakeTechcyte, task: FakeTask):
    response = httpx.post(
        f"{fake.base_url}/external/results/{task.number}",
        json={"scanResults": [good_scan()]},
        headers={"Authorization": f"Bearer {task.jwt}"},
    )
    assert response.status_code == 201


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s["geojson"]["features"][0]["properties"].pop("annotation_type"), "annotation_type"),
        (lambda s: s["geojson"]["features"][0]["properties"].update(annotation_type=3), "annotation_type"),
        (lambda s: s["results"].update(summary=["x"]), "summary"),
        (lambda s: s["workflow"]["report"].update(type="Fancy"), "report.type"),
        (lambda s: s["workflow"].update(ruo="True"), "ruo"),
        (lambda s: s.update(scanId=5550001), "numeric string"),
        (lambda s: s.update(scanId="999"), "does not belong"),
        (lambda s: s.update(qcFailReasons="blurry"), "qcFailReasons"),
    ],
)
def test_one_bad_scan_rejects_the_whole_request(fake: FakeTechcyte, task: FakeTask, mutate, reason: str):
    bad = good_scan()
    mutate(bad)
    other = good_scan()
    response = post(fake, task, {"scanResults": [other, bad]})
    assert response.status_code == 400 and reason in response.json()["detail"]
    assert fake.evaluations == [] and not task.scans["5550001"].complete  # all or nothing


def test_a_scan_with_two_regions_is_rejected(fake: FakeTechcyte, task: FakeTask):
    response = post(fake, task, {"scanResults": [good_scan(), good_scan("5550002")]})
    assert response.status_code == 400 and "exactly one image region" in response.json()["detail"]
    assert fake.evaluations == []


def test_auth_rules(fake: FakeTechcyte, task: FakeTask):
    assert post(fake, task, {"scanResults": [good_scan()]}, token="nope").status_code == 401
    other = fake.add_task({"1": [b"x"]}, case_number=7)
    assert post(fake, task, {"scanResults": [good_scan()]}, token=other.jwt).status_code == 403


def test_case_evaluations_returns_every_evaluation_of_the_case(fake: FakeTechcyte, task: FakeTask):
    fake.add_evaluation(task_number=1, case_number=task.case_number, sample_id=5550001, report={"human": "yes"})
    fake.add_evaluation(task_number=2, case_number=555, sample_id=1, report={})  # another case
    post(fake, task, {"scanResults": [good_scan()]})
    response = httpx.get(
        f"{fake.base_url}/external/case_evaluations/{task.task_id}", headers={"Authorization": f"Bearer {task.jwt}"}
    )
    assert response.status_code == 200
    assert sorted(e["task_id"] for e in response.json()) == sorted([1, task.number])


def test_triage_patch(fake: FakeTechcyte, task: FakeTask):
    url = f"{fake.base_url}/external/case/{task.task_id}"
    headers = {"Authorization": f"Bearer {task.jwt}"}
    assert httpx.patch(url, json={"triage_category": "high", "triage_score": 0.9}, headers=headers).status_code == 204
    assert httpx.patch(url, json={"triage_score": "high"}, headers=headers).status_code == 400
    assert fake.triage[task.case_number] == {"triage_category": "high", "triage_score": 0.9}


def test_files_are_served_without_extension_with_ranges_and_signature(fake: FakeTechcyte, task: FakeTask):
    url = task.scans["5550001"].urls[0]
    path = httpx.URL(url).path
    assert path.rsplit(".", 1)[-1].isdigit()  # no meaningful extension
    whole = httpx.get(url)
    assert whole.status_code == 200 and whole.content[:4] == b"II*\x00" and len(whole.content) == 204
    part = httpx.get(url, headers={"Range": "bytes=0-3"})
    assert part.status_code == 206 and part.content == b"II*\x00"
    assert part.headers["content-range"] == "bytes 0-3/204"
    assert httpx.get(url, headers={"Range": "bytes=-4"}).content == bytes(range(196, 200))
    assert httpx.get(url, headers={"Range": "bytes=999-"}).status_code == 416
    assert httpx.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403


def test_webhook_payload_shapes(fake: FakeTechcyte, task: FakeTask):
    body = fake.webhook_payload(task)
    assert base64.b64decode(body["task_id"]).decode() == f"task:{task.number}"
    assert body["case_id"] == global_id("humanCase", task.case_number)
    assert set(body["scan_urls"]) == {"5550001", "5550002"} and body["jwt_token"] == task.jwt
    legacy = fake.webhook_payload(task, legacy=True, with_jwt=False)
    assert "scan_urls" not in legacy and "jwt_token" not in legacy


def test_faults(fake: FakeTechcyte, task: FakeTask):
    fake.fail_next("results", 503)
    assert post(fake, task, {"scanResults": [good_scan()]}).status_code == 503
    assert fake.evaluations == []
    fake.fail_next("results", "drop_after_store")
    with pytest.raises(httpx.TransportError):
        post(fake, task, {"scanResults": [good_scan()]})
    assert len(fake.evaluations_of(task)) == 1  # stored although never answered
