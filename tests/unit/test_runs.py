"""The run model's state machine and statistics, without storage."""

from __future__ import annotations

import itertools

import pytest

from slidebridge.errors import IllegalTransitionError
from slidebridge.runs import (
    ITEM_TRANSITIONS,
    RUN_TRANSITIONS,
    Item,
    ItemState,
    ItemTerminationReason,
    Run,
    RunOutput,
    RunState,
    RunStatistics,
    check_item_transition,
    check_run_transition,
)

LEGAL_ITEM = {
    (ItemState.PENDING, ItemState.PROCESSING),
    (ItemState.PENDING, ItemState.TERMINATED),
    (ItemState.PROCESSING, ItemState.TERMINATED),
    (ItemState.PROCESSING, ItemState.PENDING),
}
LEGAL_RUN = {
    (RunState.PENDING, RunState.PROCESSING),
    (RunState.PENDING, RunState.TERMINATED),
    (RunState.PROCESSING, RunState.TERMINATED),
    (RunState.PROCESSING, RunState.PENDING),
}


@pytest.mark.parametrize(("current", "target"), sorted(LEGAL_ITEM))
def test_legal_item_transitions_pass(current: ItemState, target: ItemState) -> None:
    check_item_transition(current, target)


@pytest.mark.parametrize(("current", "target"), sorted(set(itertools.product(ItemState, ItemState)) - LEGAL_ITEM))
def test_illegal_item_transitions_are_refused(current: ItemState, target: ItemState) -> None:
    with pytest.raises(IllegalTransitionError, match=f"from {current} to {target}"):
        check_item_transition(current, target)


@pytest.mark.parametrize(("current", "target"), sorted(LEGAL_RUN))
def test_legal_run_transitions_pass(current: RunState, target: RunState) -> None:
    check_run_transition(current, target)


@pytest.mark.parametrize(("current", "target"), sorted(set(itertools.product(RunState, RunState)) - LEGAL_RUN))
def test_illegal_run_transitions_are_refused(current: RunState, target: RunState) -> None:
    with pytest.raises(IllegalTransitionError):
        check_run_transition(current, target)


def test_terminated_is_final_for_items_and_runs() -> None:
    assert ITEM_TRANSITIONS[ItemState.TERMINATED] == frozenset()
    assert RUN_TRANSITIONS[RunState.TERMINATED] == frozenset()


def _item(index: int, state: ItemState, reason: ItemTerminationReason | None = None) -> Item:
    return Item(run_id="r", index=index, external_id=f"s{index}", state=state, termination_reason=reason)


def test_statistics_count_every_item_exactly_once() -> None:
    items = [
        _item(0, ItemState.PENDING),
        _item(1, ItemState.PROCESSING),
        _item(2, ItemState.TERMINATED, ItemTerminationReason.SUCCEEDED),
        _item(3, ItemState.TERMINATED, ItemTerminationReason.USER_ERROR),
        _item(4, ItemState.TERMINATED, ItemTerminationReason.SYSTEM_ERROR),
        _item(5, ItemState.TERMINATED, ItemTerminationReason.SKIPPED),
        _item(6, ItemState.TERMINATED, ItemTerminationReason.SUCCEEDED),
    ]
    stats = RunStatistics.of_items(items)
    assert stats.model_dump() == {
        "item_count": 7,
        "item_pending_count": 1,
        "item_processing_count": 1,
        "item_user_error_count": 1,
        "item_system_error_count": 1,
        "item_skipped_count": 1,
        "item_succeeded_count": 2,
    }
    assert stats.open_count == 2
    buckets = sum(v for k, v in stats.model_dump().items() if k != "item_count")
    assert buckets == stats.item_count


def test_a_terminated_item_needs_a_reason() -> None:
    with pytest.raises(IllegalTransitionError):
        RunStatistics.counter_for(ItemState.TERMINATED, None)


@pytest.mark.parametrize(
    ("succeeded", "count", "expected"),
    [(0, 3, RunOutput.NONE), (1, 3, RunOutput.PARTIAL), (3, 3, RunOutput.FULL), (0, 1, RunOutput.NONE)],
)
def test_run_output_follows_succeeded_items(succeeded: int, count: int, expected: RunOutput) -> None:
    run = Run(
        application_id="he-tissue",
        version_number="1.0.0",
        organization_id="o",
        submitted_by="u",
        statistics=RunStatistics(item_count=count, item_succeeded_count=succeeded),
    )
    assert run.output is expected
