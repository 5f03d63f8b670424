"""job_events Lambda: a job that died leaves no item open."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from lambdas.api import deps
from lambdas.job_events.handler import handler
from slidebridge.launcher import CANCEL_REASON_PREFIX
from slidebridge.runs import Item, ItemState, ItemTerminationReason, Run, RunState, RunTerminationReason
from slidebridge.store import RunStore
from tests.apigw import LambdaContext

FIXTURE = Path(__file__).parent.parent / "fixtures" / "batch_job_state_change_failed.json"


def _event(run_id: str, *, status: str = "FAILED", index: int | None = None) -> dict[str, Any]:
    event: dict[str, Any] = copy.deepcopy(json.loads(FIXTURE.read_text()))
    event["detail"]["parameters"]["run_id"] = run_id
    event["detail"]["status"] = status
    if index is not None:
        event["detail"]["arrayProperties"] = {"index": index}
    return event


def _run(store: RunStore, n: int) -> Run:
    run = Run(application_id="he-tissue", version_number="1.0.0", organization_id="o", submitted_by="u")
    return store.create_run(run, [Item(run_id=run.run_id, index=i, external_id=f"s{i}") for i in range(n)])


def test_failed_job_ends_open_items_as_system_error(store: RunStore) -> None:
    deps.reset()
    run = _run(store, 2)
    store.transition_item(run.run_id, 0, ItemState.PROCESSING)
    store.transition_item(run.run_id, 0, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED)
    store.transition_item(run.run_id, 1, ItemState.PROCESSING)

    result = handler(_event(run.run_id), LambdaContext())  # type: ignore[arg-type]

    assert result == {"ended_items": 1}
    item = store.get_item(run.run_id, 1)
    assert item.termination_reason is ItemTerminationReason.SYSTEM_ERROR
    assert item.error_code == "JOB_FAILED"
    assert "Host EC2" in (item.error_message or "")
    assert store.get_item(run.run_id, 0).termination_reason is ItemTerminationReason.SUCCEEDED
    final = store.get_run(run.run_id)
    assert final.state is RunState.TERMINATED
    assert final.statistics.item_system_error_count == 1


def test_array_child_failure_ends_only_its_item(store: RunStore) -> None:
    deps.reset()
    run = _run(store, 3)
    assert handler(_event(run.run_id, index=2), LambdaContext()) == {"ended_items": 1}  # type: ignore[arg-type]
    assert store.get_item(run.run_id, 2).state is ItemState.TERMINATED
    assert store.get_item(run.run_id, 0).state is ItemState.PENDING


def test_other_states_and_unknown_runs_change_nothing(store: RunStore) -> None:
    deps.reset()
    run = _run(store, 1)
    assert handler(_event(run.run_id, status="SUCCEEDED"), LambdaContext()) == {"ended_items": 0}  # type: ignore[arg-type]
    assert store.get_item(run.run_id, 0).state is ItemState.PENDING
    unknown = "00000000-0000-4000-8000-000000000000"
    assert handler(_event(unknown), LambdaContext()) == {"ended_items": 0}  # type: ignore[arg-type]


def test_job_we_cancelled_ends_its_items_skipped_not_failed(store: RunStore) -> None:
    # Given a cancel whose TerminateJob went out but whose own write of the run did not land
    deps.reset()
    run = _run(store, 2)
    store.transition_item(run.run_id, 0, ItemState.PROCESSING)
    event = _event(run.run_id)
    event["detail"]["statusReason"] = CANCEL_REASON_PREFIX + "cancelled through the Platform API"

    # When Batch reports the stopped job as FAILED
    handler(event, LambdaContext())  # type: ignore[arg-type]

    # Then the run ends cancelled and no item reads as a system error
    final = store.get_run(run.run_id)
    assert final.termination_reason is RunTerminationReason.CANCELED_BY_USER
    assert final.error_message == "cancelled through the Platform API"
    assert final.statistics.item_system_error_count == 0
    assert [i.termination_reason for i in store.list_items(run.run_id)] == [ItemTerminationReason.SKIPPED] * 2
    # A second report of the same job changes nothing.
    handler(event, LambdaContext())  # type: ignore[arg-type]
    assert store.get_run(run.run_id).version == final.version
