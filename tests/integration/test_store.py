"""RunStore on DynamoDB (moto): conditional writes, legal/illegal transitions, consistent counters."""

from __future__ import annotations

import threading

import boto3
import pytest

from slidebridge.errors import IllegalTransitionError, NotFoundError
from slidebridge.runs import (
    InputArtifact,
    Item,
    ItemOutput,
    ItemState,
    ItemTerminationReason,
    Run,
    RunOutput,
    RunState,
    RunStatistics,
    RunTerminationReason,
)
from slidebridge.store import DuplicateRunError, RunStore
from tests.integration.conftest import TABLE


def _new_run(store: RunStore, n_items: int = 2, *, key: str | None = None, aliases: tuple[str, ...] = ()) -> Run:
    run = Run(application_id="he-tissue", version_number="1.0.0", organization_id="org-a", submitted_by="u1")
    items = [
        Item(
            run_id=run.run_id,
            index=i,
            external_id=f"slide-{i}.svs",
            input_artifacts=[InputArtifact(name="whole_slide_image", download_url="https://x/y", metadata={})],
        )
        for i in range(n_items)
    ]
    return store.create_run(run, items, idempotency_key=key, aliases=aliases)


def _assert_counters_match_items(store: RunStore, run_id: str) -> None:
    run = store.get_run(run_id)
    assert run.statistics == RunStatistics.of_items(store.list_items(run_id))


def test_created_run_is_pending_with_all_items_counted(store: RunStore) -> None:
    run = _new_run(store, 3)
    stored = store.get_run(run.run_id)
    assert stored.state is RunState.PENDING
    assert stored.statistics.item_count == 3
    assert stored.statistics.item_pending_count == 3
    assert [i.external_id for i in store.list_items(run.run_id)] == ["slide-0.svs", "slide-1.svs", "slide-2.svs"]


def test_item_lifecycle_moves_run_through_processing_to_terminated(store: RunStore) -> None:
    run = _new_run(store, 2)
    store.transition_item(run.run_id, 0, ItemState.PROCESSING)
    assert store.get_run(run.run_id).state is RunState.PROCESSING
    _assert_counters_match_items(store, run.run_id)

    store.transition_item(run.run_id, 0, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED)
    store.transition_item(run.run_id, 1, ItemState.PROCESSING)
    store.transition_item(
        run.run_id, 1, ItemState.TERMINATED, reason=ItemTerminationReason.USER_ERROR, error_code="UNSUPPORTED_FORMAT"
    )
    final = store.get_run(run.run_id)
    assert final.state is RunState.TERMINATED
    assert final.termination_reason is RunTerminationReason.ALL_ITEMS_PROCESSED
    assert final.terminated_at is not None
    assert final.output is RunOutput.PARTIAL
    assert final.statistics.item_succeeded_count == 1
    assert final.statistics.item_user_error_count == 1
    item = store.get_item(run.run_id, 1)
    assert item.output is ItemOutput.NONE
    assert item.error_code == "UNSUPPORTED_FORMAT"
    assert store.get_item(run.run_id, 0).output is ItemOutput.FULL
    _assert_counters_match_items(store, run.run_id)


def test_terminated_item_cannot_go_back_to_processing(store: RunStore) -> None:
    run = _new_run(store, 1)
    store.transition_item(run.run_id, 0, ItemState.PROCESSING)
    store.transition_item(run.run_id, 0, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED)
    with pytest.raises(IllegalTransitionError, match="TERMINATED to PROCESSING"):
        store.transition_item(run.run_id, 0, ItemState.PROCESSING)
    assert store.get_item(run.run_id, 0).state is ItemState.TERMINATED
    _assert_counters_match_items(store, run.run_id)


def test_requeued_item_takes_run_back_to_pending(store: RunStore) -> None:
    run = _new_run(store, 1)
    store.transition_item(run.run_id, 0, ItemState.PROCESSING)
    store.transition_item(run.run_id, 0, ItemState.PENDING)
    assert store.get_run(run.run_id).state is RunState.PENDING
    _assert_counters_match_items(store, run.run_id)


def test_terminated_run_refuses_another_termination(store: RunStore) -> None:
    run = _new_run(store, 2)
    store.transition_item(run.run_id, 0, ItemState.PROCESSING)
    store.transition_item(run.run_id, 0, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED)
    cancelled = store.terminate_run(run.run_id, RunTerminationReason.CANCELED_BY_USER)
    assert cancelled.state is RunState.TERMINATED
    assert cancelled.termination_reason is RunTerminationReason.CANCELED_BY_USER
    # The finished item keeps its result; the open one was skipped.
    assert store.get_item(run.run_id, 0).termination_reason is ItemTerminationReason.SUCCEEDED
    assert store.get_item(run.run_id, 1).termination_reason is ItemTerminationReason.SKIPPED
    with pytest.raises(IllegalTransitionError):
        store.terminate_run(run.run_id, RunTerminationReason.CANCELED_BY_USER)
    _assert_counters_match_items(store, run.run_id)


@pytest.mark.parametrize("round_", range(5))
def test_concurrent_writers_lose_no_update(store: RunStore, round_: int) -> None:
    """Sixteen workers race to close eight items, two per item: one wins, the other is refused.

    The refused writer's transaction is cancelled while the others commit; every counter change
    survives (a retried array child racing the first attempt, or job_events racing the job).
    Several rounds, because a lost update shows only in some interleavings.
    """
    n = 8
    run = _new_run(store, n)
    for i in range(n):
        store.transition_item(run.run_id, i, ItemState.PROCESSING)
    barrier = threading.Barrier(2 * n)
    refused: list[int] = []
    errors: list[BaseException] = []

    def close(index: int) -> None:
        barrier.wait()
        try:
            store.transition_item(run.run_id, index, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED)
        except IllegalTransitionError:
            refused.append(index)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=close, args=(i % n,)) for i in range(2 * n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(refused) == list(range(n))
    final = store.get_run(run.run_id)
    assert final.statistics.item_succeeded_count == n
    assert final.statistics.open_count == 0
    assert final.state is RunState.TERMINATED
    assert final.output is RunOutput.FULL
    _assert_counters_match_items(store, run.run_id)


def test_two_writers_racing_on_one_item_terminate_it_once(store: RunStore) -> None:
    run = _new_run(store, 1)
    store.transition_item(run.run_id, 0, ItemState.PROCESSING)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def finish(reason: ItemTerminationReason) -> None:
        barrier.wait()
        try:
            store.transition_item(run.run_id, 0, ItemState.TERMINATED, reason=reason)
            outcomes.append("ok")
        except IllegalTransitionError:
            outcomes.append("refused")

    threads = [
        threading.Thread(target=finish, args=(r,))
        for r in (ItemTerminationReason.SUCCEEDED, ItemTerminationReason.SKIPPED)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok", "refused"]
    stats = store.get_run(run.run_id).statistics
    assert stats.item_succeeded_count + stats.item_skipped_count == 1
    _assert_counters_match_items(store, run.run_id)


def test_idempotency_key_starts_one_run_only(store: RunStore) -> None:
    first = _new_run(store, 1, key="sectra:app:slide:token")
    with pytest.raises(DuplicateRunError) as caught:
        _new_run(store, 1, key="sectra:app:slide:token")
    assert caught.value.run_id == first.run_id
    runs = list(store.iter_runs("org-a"))
    assert [r.run_id for r in runs] == [first.run_id]


def test_aliases_are_written_with_the_run_and_a_refused_duplicate_moves_none(store: RunStore) -> None:
    # Given a run created with the lookups a Sectra cancel uses
    first = _new_run(store, 1, key="sectra:app:slide-a:t1", aliases=("sectra-slide:app:slide-a",))
    assert store.find_alias("sectra-slide:app:slide-a") == first.run_id

    # When a retry of the same create (same key) races in with its own run id
    with pytest.raises(DuplicateRunError):
        _new_run(store, 1, key="sectra:app:slide-a:t1", aliases=("sectra-slide:app:slide-a", "sectra-result:app:r9"))

    # Then the lookups still lead to the run that exists, and the refused one left no lookup behind
    assert store.find_alias("sectra-slide:app:slide-a") == first.run_id
    assert store.find_alias("sectra-result:app:r9") is None

    # A new create for the same slide (a new cancellation token) takes the slide's lookup over
    second = _new_run(store, 1, key="sectra:app:slide-a:t2", aliases=("sectra-slide:app:slide-a",))
    assert store.find_alias("sectra-slide:app:slide-a") == second.run_id


def test_large_run_is_written_whole_with_its_aliases(store: RunStore) -> None:
    run = _new_run(store, 150, aliases=("platform:batch-7",))
    assert store.find_alias("platform:batch-7") == run.run_id
    assert store.get_run(run.run_id).statistics.item_count == 150
    assert len(store.list_items(run.run_id)) == 150


def test_missing_run_is_not_found(store: RunStore) -> None:
    with pytest.raises(NotFoundError):
        store.get_run("00000000-0000-0000-0000-000000000000")


def test_fail_open_items_closes_only_open_ones(store: RunStore) -> None:
    run = _new_run(store, 3)
    store.transition_item(run.run_id, 0, ItemState.PROCESSING)
    store.transition_item(run.run_id, 0, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED)
    store.transition_item(run.run_id, 1, ItemState.PROCESSING)
    ended = store.fail_open_items(run.run_id, indices=None, error_code="JOB_FAILED", error_message="spot reclaim")
    assert sorted(i.index for i in ended) == [1, 2]
    final = store.get_run(run.run_id)
    assert final.state is RunState.TERMINATED
    assert final.statistics.item_system_error_count == 2
    assert final.statistics.item_succeeded_count == 1


def test_tokens_are_stored_hashed(store: RunStore) -> None:
    store.register_api_token("s3cret-token-value", user_id="u1", organization_id="org-a")
    principal = store.authenticate("s3cret-token-value")
    assert principal is not None
    assert principal.organization_id == "org-a"
    assert store.authenticate("other") is None
    dump = str(boto3.client("dynamodb").scan(TableName=TABLE)["Items"])
    assert "s3cret-token-value" not in dump
