"""RunStore: runs, items and API tokens in one DynamoDB table, every change a conditional write.

Layout (single table, string keys ``pk``/``sk``):

| record      | pk                 | sk            | notes                                         |
|-------------|--------------------|---------------|-----------------------------------------------|
| run         | ``RUN#<run_id>``   | ``RUN``       | gsi1: ``ORG#<org>`` / ``<submitted_at>#<id>``  |
| item        | ``RUN#<run_id>``   | ``ITEM#00007``| one per item, ordered by index                |
| idempotency | ``IDEM#<key>``     | ``IDEM``      | a vendor delivery key → the run it started    |
| API token   | ``TOKEN#<sha256>`` | ``TOKEN``     | only the hash of the token is stored          |
| credential  | ``RUN#<run_id>``   | ``CRED#<name>``| a vendor token, apart from the run; TTL      |
| delivery    | ``RUN#<run_id>``   | ``DELIVERY#<channel>`` | lock + outcome of a non-idempotent post |
| deadline    | ``RUN#<run_id>``   | ``DEADLINE``  | gsi1: ``DEADLINES`` / ``<deadline>#<id>``; see below |

Each run and item record holds its pydantic model as JSON in ``doc`` plus the attributes that
conditions and atomic counters need (``state``, ``version``, the seven statistics counters).
An item transition and the run's counters change in one transaction, so the statistics can never
disagree with the items; the run's own state then follows from the counters by a conditional
write that re-reads and retries when another writer got there first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import boto3
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field

from slidebridge.errors import ConflictError, IllegalTransitionError, NotFoundError
from slidebridge.runs import (
    Item,
    ItemOutput,
    ItemState,
    ItemTerminationReason,
    OutputArtifact,
    Run,
    RunState,
    RunStatistics,
    RunTerminationReason,
    check_item_transition,
    check_run_transition,
    new_id,
    utcnow,
)

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

logger = logging.getLogger(__name__)

# The table's schema, shared by the local stack (create_table) and checked against the CDK stack.
TABLE_DEFINITION: dict[str, Any] = {
    "AttributeDefinitions": [
        {"AttributeName": "pk", "AttributeType": "S"},
        {"AttributeName": "sk", "AttributeType": "S"},
        {"AttributeName": "gsi1pk", "AttributeType": "S"},
        {"AttributeName": "gsi1sk", "AttributeType": "S"},
    ],
    "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
    "GlobalSecondaryIndexes": [
        {
            "IndexName": "gsi1",
            "KeySchema": [
                {"AttributeName": "gsi1pk", "KeyType": "HASH"},
                {"AttributeName": "gsi1sk", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "ALL"},
        }
    ],
    "BillingMode": "PAY_PER_REQUEST",
}
TTL_ATTRIBUTE = "expires_at"

COUNTERS = tuple(RunStatistics.model_fields)
# DynamoDB allows 100 actions per transaction.
_MAX_ACTIONS_PER_TRANSACTION = 100
_MAX_SETTLE_ATTEMPTS = 20


class Principal(BaseModel):
    """Who called the Platform API: the user and organisation an API token is bound to."""

    user_id: str
    organization_id: str


class DeliveryState(StrEnum):
    POSTING = "posting"  # a holder is delivering; its lease says until when
    DELIVERED = "delivered"
    RELEASED = "released"  # the last attempt failed transiently; the next claim may go ahead
    FAILED = "failed"  # refused for good by the peer; an operator must look


class Delivery(BaseModel):
    """The record of one non-idempotent delivery of a run (``RUN#<id>`` / ``DELIVERY#<channel>``)."""

    state: DeliveryState
    holder: str
    attempts: int
    lease_until: datetime
    updated_at: datetime
    error: str | None = None


class DeliveryBusyError(ConflictError):
    """Another holder is delivering now (its lease has not run out)."""

    def __init__(self, delivery: Delivery) -> None:
        super().__init__(f"delivery in progress until {delivery.lease_until.isoformat()}")
        self.delivery = delivery


class DeliveryClosedError(ConflictError):
    """The delivery was already made, or given up after a permanent refusal."""

    def __init__(self, delivery: Delivery) -> None:
        super().__init__(f"delivery already {delivery.state}")
        self.delivery = delivery


class DuplicateRunError(ConflictError):
    """A run was already started for this idempotency key."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"a run already exists for this request: {run_id}")
        self.run_id = run_id


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _run_key(run_id: str) -> dict[str, Any]:
    return {"pk": {"S": f"RUN#{run_id}"}, "sk": {"S": "RUN"}}


def _item_key(run_id: str, index: int) -> dict[str, Any]:
    return {"pk": {"S": f"RUN#{run_id}"}, "sk": {"S": f"ITEM#{index:05d}"}}


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


_DEADLINES_PARTITION = "DEADLINES"
_LAUNCHES_PARTITION = "LAUNCHES"


def _sortable_time(value: datetime) -> str:
    # Fixed width (always microseconds, always UTC) so that string order is time order; _iso drops
    # ".000000" and keeps other offsets, and "10:00:00Z" would sort after "10:00:00.5Z".
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _alias_record(key: str, run_id: str) -> dict[str, Any]:
    return {"pk": {"S": f"ALIAS#{key}"}, "sk": {"S": "ALIAS"}, "run_id": {"S": run_id}}


def _deadline_record(run_id: str, deadline: datetime) -> dict[str, Any]:
    return _timed_record(run_id, "DEADLINE", _DEADLINES_PARTITION, deadline)


def _launch_record(run_id: str, submitted_at: datetime) -> dict[str, Any]:
    return _timed_record(run_id, "LAUNCH", _LAUNCHES_PARTITION, submitted_at)


def _timed_record(run_id: str, sk: str, partition: str, when: datetime) -> dict[str, Any]:
    return {
        "pk": {"S": f"RUN#{run_id}"},
        "sk": {"S": sk},
        "gsi1pk": {"S": partition},
        "gsi1sk": {"S": f"{_sortable_time(when)}#{run_id}"},
        "run_id": {"S": run_id},
    }


def _is_condition_failure(exc: ClientError) -> bool:
    code = exc.response.get("Error", {}).get("Code", "")
    if code == "ConditionalCheckFailedException":
        return True
    if code == "TransactionCanceledException":
        reasons = exc.response.get("CancellationReasons", [])
        return any(r.get("Code") == "ConditionalCheckFailed" for r in reasons) or not reasons
    return False


class RunStore:
    """Reads and writes runs and items; every write is conditional (no lost updates)."""

    def __init__(self, table_name: str, client: DynamoDBClient | None = None) -> None:
        self.table_name = table_name
        self._client = client

    @property
    def client(self) -> DynamoDBClient:
        # Created lazily: importing a handler must not touch AWS (cold start, tests).
        if self._client is None:
            self._client = boto3.client("dynamodb")
        return self._client

    # --- serialisation ------------------------------------------------------------------------

    def _run_record(self, run: Run) -> dict[str, Any]:
        record: dict[str, Any] = {
            **_run_key(run.run_id),
            "gsi1pk": {"S": f"ORG#{run.organization_id}"},
            # Fixed-width time: the index order is then submission order, which lists rely on.
            "gsi1sk": {"S": f"{_sortable_time(run.submitted_at)}#{run.run_id}"},
            "state": {"S": run.state.value},
            "version": {"N": str(run.version)},
            "doc": {"S": run.model_dump_json(exclude={"statistics", "state", "version"})},
        }
        for name in COUNTERS:
            record[name] = {"N": str(getattr(run.statistics, name))}
        return record

    @staticmethod
    def _run_from_record(record: dict[str, Any]) -> Run:
        doc = json.loads(record["doc"]["S"])
        doc["state"] = record["state"]["S"]
        doc["version"] = int(record["version"]["N"])
        doc["statistics"] = {name: int(record[name]["N"]) for name in COUNTERS}
        return Run.model_validate(doc)

    @staticmethod
    def _item_record(item: Item) -> dict[str, Any]:
        return {
            **_item_key(item.run_id, item.index),
            "state": {"S": item.state.value},
            "version": {"N": str(item.version)},
            "doc": {"S": item.model_dump_json(exclude={"version"})},
        }

    @staticmethod
    def _item_from_record(record: dict[str, Any]) -> Item:
        doc = json.loads(record["doc"]["S"])
        doc["version"] = int(record["version"]["N"])
        return Item.model_validate(doc)

    # --- runs ---------------------------------------------------------------------------------

    def create_run(
        self,
        run: Run,
        items: list[Item],
        *,
        idempotency_key: str | None = None,
        credentials: dict[str, str] | None = None,
        aliases: Sequence[str] = (),
    ) -> Run:
        """Store a new run with its items, all or nothing.

        With an ``idempotency_key``, a second call for the same key raises ``DuplicateRunError``
        naming the first run, and writes nothing. ``credentials`` (name → secret, e.g. a vendor's
        task token) are written with the run record, so a run never exists without them and a
        refused duplicate leaves none behind. ``aliases`` (lookup keys, as ``put_alias`` takes them)
        point at the new run from the same write, so a vendor's later cancel or delete always finds
        a run that exists, and a refused duplicate moves no alias.
        """
        run = run.model_copy(update={"statistics": RunStatistics.of_items(items), "version": 0})
        puts: list[dict[str, Any]] = [
            {
                "Put": {
                    "TableName": self.table_name,
                    "Item": self._credential_record(run.run_id, name, value),
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            }
            for name, value in (credentials or {}).items()
        ]
        # No condition: an alias is a pointer, and the latest run for a key wins (as in put_alias).
        puts.extend({"Put": {"TableName": self.table_name, "Item": _alias_record(key, run.run_id)}} for key in aliases)
        if idempotency_key is not None:
            puts.append(
                {
                    "Put": {
                        "TableName": self.table_name,
                        "Item": {
                            "pk": {"S": f"IDEM#{idempotency_key}"},
                            "sk": {"S": "IDEM"},
                            "run_id": {"S": run.run_id},
                        },
                        "ConditionExpression": "attribute_not_exists(pk)",
                    }
                }
            )
        # Every run waits for its job from here on: the record goes when the job id is recorded, and
        # a sweep ends runs whose creator was cut short before that (see due_launches).
        puts.append(
            {
                "Put": {
                    "TableName": self.table_name,
                    "Item": _launch_record(run.run_id, run.submitted_at),
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            }
        )
        if run.scheduling is not None and run.scheduling.deadline is not None:
            puts.append(
                {
                    "Put": {
                        "TableName": self.table_name,
                        "Item": _deadline_record(run.run_id, run.scheduling.deadline),
                        "ConditionExpression": "attribute_not_exists(pk)",
                    }
                }
            )
        puts.append(
            {
                "Put": {
                    "TableName": self.table_name,
                    "Item": self._run_record(run),
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            }
        )
        item_puts = [
            {
                "Put": {
                    "TableName": self.table_name,
                    "Item": self._item_record(item),
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            }
            for item in items
        ]
        if len(items) + len(puts) <= _MAX_ACTIONS_PER_TRANSACTION:
            try:
                self.client.transact_write_items(TransactItems=puts + item_puts)
            except ClientError as exc:
                if idempotency_key is not None and _is_condition_failure(exc):
                    existing = self.find_idempotent_run(idempotency_key)
                    if existing is not None:
                        raise DuplicateRunError(existing) from exc
                raise
            return run
        # Larger runs: items first (invisible without their run record), the run record last with
        # the idempotency key; on failure the items are removed again.
        written: list[Item] = []
        try:
            for start in range(0, len(item_puts), 100):
                self.client.transact_write_items(TransactItems=item_puts[start : start + 100])
                written.extend(items[start : start + 100])
            self.client.transact_write_items(TransactItems=puts)
        except ClientError as exc:
            self._delete_items(written)
            if idempotency_key is not None and _is_condition_failure(exc):
                existing = self.find_idempotent_run(idempotency_key)
                if existing is not None:
                    raise DuplicateRunError(existing) from exc
            raise
        return run

    def _delete_items(self, items: list[Item]) -> None:
        for item in items:
            self.client.delete_item(TableName=self.table_name, Key=_item_key(item.run_id, item.index))

    def find_idempotent_run(self, idempotency_key: str) -> str | None:
        response = self.client.get_item(
            TableName=self.table_name,
            Key={"pk": {"S": f"IDEM#{idempotency_key}"}, "sk": {"S": "IDEM"}},
            ConsistentRead=True,
        )
        record = response.get("Item")
        return record["run_id"]["S"] if record else None

    def get_run(self, run_id: str) -> Run:
        response = self.client.get_item(TableName=self.table_name, Key=_run_key(run_id), ConsistentRead=True)
        if "Item" not in response:
            raise NotFoundError(f"run {run_id} not found")
        return self._run_from_record(response["Item"])

    def list_items(self, run_id: str) -> list[Item]:
        items: list[Item] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :prefix)",
            "ExpressionAttributeValues": {":pk": {"S": f"RUN#{run_id}"}, ":prefix": {"S": "ITEM#"}},
            "ConsistentRead": True,
        }
        while True:
            response = self.client.query(**kwargs)
            items.extend(self._item_from_record(record) for record in response.get("Items", []))
            if "LastEvaluatedKey" not in response:
                return items
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def get_item(self, run_id: str, index: int) -> Item:
        response = self.client.get_item(TableName=self.table_name, Key=_item_key(run_id, index), ConsistentRead=True)
        if "Item" not in response:
            raise NotFoundError(f"item {index} of run {run_id} not found")
        return self._item_from_record(response["Item"])

    def _update_run(self, run_id: str, change: Callable[[Run], Run | None]) -> Run:
        """Apply ``change`` to the current run with a version-conditioned put; re-read on conflict.

        ``change`` returns the new run, or None when nothing needs writing.
        """
        for _ in range(_MAX_SETTLE_ATTEMPTS):
            current = self.get_run(run_id)
            updated = change(current)
            if updated is None:
                return current
            record = self._run_record(updated.model_copy(update={"version": current.version + 1}))
            # Counters are owned by item transactions: never overwrite them from a stale read.
            for name in COUNTERS:
                record.pop(name)
            names = {f"#{k}": k for k in record if k not in ("pk", "sk")}
            values = {f":{k}": v for k, v in record.items() if k not in ("pk", "sk")}
            values[":expected"] = {"N": str(current.version)}
            try:
                self.client.update_item(
                    TableName=self.table_name,
                    Key=_run_key(run_id),
                    UpdateExpression="SET " + ", ".join(f"#{k} = :{k}" for k in record if k not in ("pk", "sk")),
                    ConditionExpression="#version = :expected",
                    ExpressionAttributeNames=names,
                    ExpressionAttributeValues=values,
                )
            except ClientError as exc:
                if _is_condition_failure(exc):
                    continue
                raise
            return self.get_run(run_id)
        raise ConflictError(f"run {run_id} kept changing; gave up after {_MAX_SETTLE_ATTEMPTS} attempts")

    def update_run(self, run_id: str, change: Callable[[Run], Run | None]) -> Run:
        """Apply ``change`` to the current run, conditioned on the version it read; re-read and re-apply on conflict.

        ``change`` may raise to refuse (e.g. a stale precondition): nothing is written then. It returns the
        new run, or None when nothing needs writing. The statistics counters are never written from here.
        """
        return self._update_run(run_id, change)

    def set_job_id(self, run_id: str, job_id: str) -> Run:
        return self._update_run(run_id, lambda run: run.model_copy(update={"job_id": job_id}))

    def settle_run(self, run_id: str) -> Run:
        """Bring the run's state in line with its item counters.

        PENDING while nothing has started, PROCESSING while items are open and some have started,
        TERMINATED (ALL_ITEMS_PROCESSED) once no item is open.
        """

        def change(run: Run) -> Run | None:
            if run.state is RunState.TERMINATED:
                return None
            stats = run.statistics
            started = stats.item_count - stats.item_pending_count
            if stats.open_count == 0:
                target = RunState.TERMINATED
            elif started > 0:
                target = RunState.PROCESSING
            else:
                target = RunState.PENDING
            if target is run.state:
                return None
            check_run_transition(run.state, target)
            update: dict[str, Any] = {"state": target}
            if target is RunState.TERMINATED:
                update |= {
                    "termination_reason": RunTerminationReason.ALL_ITEMS_PROCESSED,
                    "terminated_at": utcnow(),
                }
            return run.model_copy(update=update)

        return self._update_run(run_id, change)

    def terminate_run(
        self,
        run_id: str,
        reason: RunTerminationReason,
        *,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> Run:
        """Cancel a run: the run ends first, then its open items end SKIPPED.

        Finished items keep their artifacts. Ending the run first keeps ``settle_run`` from calling
        it ALL_ITEMS_PROCESSED when the last open item is skipped. Raises IllegalTransitionError
        when the run has already terminated.
        """

        def change(current: Run) -> Run | None:
            check_run_transition(current.state, RunState.TERMINATED)
            return current.model_copy(
                update={
                    "state": RunState.TERMINATED,
                    "termination_reason": reason,
                    "terminated_at": utcnow(),
                    "error_code": error_code,
                    "error_message": error_message,
                }
            )

        self._update_run(run_id, change)
        for item in self.list_items(run_id):
            if item.state is not ItemState.TERMINATED:
                # It may terminate on its own meanwhile; its result then stands.
                with contextlib.suppress(IllegalTransitionError):
                    self.transition_item(
                        run_id,
                        item.index,
                        ItemState.TERMINATED,
                        reason=ItemTerminationReason.SKIPPED,
                        error_message="cancelled before it finished",
                    )
        return self.get_run(run_id)

    # --- items --------------------------------------------------------------------------------

    def transition_item(
        self,
        run_id: str,
        index: int,
        target: ItemState,
        *,
        reason: ItemTerminationReason | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        output_artifacts: list[OutputArtifact] | None = None,
    ) -> Item:
        """Move one item to ``target`` and its run's counters with it, atomically.

        Raises IllegalTransitionError for a transition the model forbids (e.g. out of TERMINATED);
        a concurrent writer makes it re-read and re-check, so no update is lost.
        """
        if (target is ItemState.TERMINATED) != (reason is not None):
            raise IllegalTransitionError("a termination reason goes with TERMINATED, and only with it")
        for _ in range(_MAX_SETTLE_ATTEMPTS):
            item = self.get_item(run_id, index)
            check_item_transition(item.state, target)
            update: dict[str, Any] = {
                "state": target,
                "termination_reason": reason,
                "error_code": error_code,
                "error_message": error_message,
                "version": item.version + 1,
            }
            if target is ItemState.TERMINATED:
                update["terminated_at"] = utcnow()
                update["output"] = ItemOutput.FULL if reason is ItemTerminationReason.SUCCEEDED else ItemOutput.NONE
            if output_artifacts is not None:
                update["output_artifacts"] = output_artifacts
            new_item = item.model_copy(update=update)
            old_counter = RunStatistics.counter_for(item.state, item.termination_reason)
            new_counter = RunStatistics.counter_for(target, reason)
            record = self._item_record(new_item)
            try:
                self.client.transact_write_items(
                    TransactItems=[
                        {
                            "Put": {
                                "TableName": self.table_name,
                                "Item": record,
                                "ConditionExpression": "#version = :expected",
                                "ExpressionAttributeNames": {"#version": "version"},
                                "ExpressionAttributeValues": {":expected": {"N": str(item.version)}},
                            }
                        },
                        {
                            "Update": {
                                "TableName": self.table_name,
                                "Key": _run_key(run_id),
                                "UpdateExpression": "ADD #old :minus, #new :plus",
                                "ConditionExpression": "attribute_exists(pk)",
                                "ExpressionAttributeNames": {"#old": old_counter, "#new": new_counter},
                                "ExpressionAttributeValues": {":minus": {"N": "-1"}, ":plus": {"N": "1"}},
                            }
                        },
                    ]
                )
            except ClientError as exc:
                if _is_condition_failure(exc):
                    logger.debug("item %s/%s changed concurrently; re-reading", run_id, index)
                    continue
                raise
            self.settle_run(run_id)
            return new_item
        raise ConflictError(f"item {index} of run {run_id} kept changing; gave up")

    def fail_open_items(
        self, run_id: str, *, indices: list[int] | None, error_code: str, error_message: str
    ) -> list[Item]:
        """End every still-open item (of ``indices``, or all) with SYSTEM_ERROR; returns those it ended.

        Used when a job died without closing its books (spot reclaim after the last retry, OOM kill).
        """
        ended: list[Item] = []
        for item in self.list_items(run_id):
            if item.state is ItemState.TERMINATED or (indices is not None and item.index not in indices):
                continue
            with contextlib.suppress(IllegalTransitionError):
                ended.append(
                    self.transition_item(
                        run_id,
                        item.index,
                        ItemState.TERMINATED,
                        reason=ItemTerminationReason.SYSTEM_ERROR,
                        error_code=error_code,
                        error_message=error_message,
                    )
                )
        return ended

    def update_item(self, run_id: str, index: int, change: Callable[[Item], Item | None]) -> Item:
        """Apply ``change`` to the current item without a state change (custom metadata, artifacts' output).

        Conditioned on the version it read, re-read and re-applied on conflict, like ``update_run``.
        ``change`` must not change the item's state: state changes go through ``transition_item``, which
        keeps the run's counters in step.
        """
        for _ in range(_MAX_SETTLE_ATTEMPTS):
            item = self.get_item(run_id, index)
            updated = change(item)
            if updated is None:
                return item
            if updated.state is not item.state:
                raise IllegalTransitionError("update_item cannot change an item's state; use transition_item")
            new_item = updated.model_copy(update={"version": item.version + 1})
            try:
                self.client.put_item(
                    TableName=self.table_name,
                    Item=self._item_record(new_item),
                    ConditionExpression="#version = :expected",
                    ExpressionAttributeNames={"#version": "version"},
                    ExpressionAttributeValues={":expected": {"N": str(item.version)}},
                )
            except ClientError as exc:
                if _is_condition_failure(exc):
                    continue
                raise
            return new_item
        raise ConflictError(f"item {index} of run {run_id} kept changing; gave up")

    def update_vendor_context(self, run_id: str, changes: dict[str, Any]) -> Run:
        """Merge ``changes`` into the run's vendor context (e.g. the Sectra result's new versionId)."""
        return self._update_run(
            run_id, lambda run: run.model_copy(update={"vendor_context": {**run.vendor_context, **changes}})
        )

    # --- aliases and credentials --------------------------------------------------------------

    def put_alias(self, key: str, run_id: str) -> None:
        """Point a lookup key (a vendor's result id, a slide) at a run; the latest write wins."""
        self.client.put_item(TableName=self.table_name, Item=_alias_record(key, run_id))

    def find_alias(self, key: str) -> str | None:
        response = self.client.get_item(
            TableName=self.table_name,
            Key={"pk": {"S": f"ALIAS#{key}"}, "sk": {"S": "ALIAS"}},
            ConsistentRead=True,
        )
        record = response.get("Item")
        return record["run_id"]["S"] if record else None

    def put_credential(self, run_id: str, name: str, value: str, *, expires_at: datetime | None = None) -> None:
        """Store a vendor credential apart from the run record (never in the run's doc or in logs).

        The table is encrypted at rest with the stack's KMS key; ``expires_at`` feeds DynamoDB's TTL.
        """
        self.client.put_item(TableName=self.table_name, Item=self._credential_record(run_id, name, value, expires_at))

    @staticmethod
    def _credential_record(run_id: str, name: str, value: str, expires_at: datetime | None = None) -> dict[str, Any]:
        item: dict[str, Any] = {
            "pk": {"S": f"RUN#{run_id}"},
            "sk": {"S": f"CRED#{name}"},
            "value": {"S": value},
        }
        if expires_at is not None:
            item[TTL_ATTRIBUTE] = {"N": str(int(expires_at.timestamp()))}
        return item

    def get_credential(self, run_id: str, name: str) -> str | None:
        response = self.client.get_item(
            TableName=self.table_name,
            Key={"pk": {"S": f"RUN#{run_id}"}, "sk": {"S": f"CRED#{name}"}},
            ConsistentRead=True,
        )
        record = response.get("Item")
        if record is None:
            return None
        expires = record.get(TTL_ATTRIBUTE)
        # DynamoDB deletes expired items lazily (up to days later): treat them as gone already.
        if expires is not None and int(expires["N"]) < int(utcnow().timestamp()):
            return None
        value: str = record["value"]["S"]
        return value

    def expire_credentials(self, run_id: str, after_s: int) -> None:
        """Let the run's credentials expire ``after_s`` seconds from now (called once the run ends)."""
        expires_at = int(utcnow().timestamp()) + after_s
        response = self.client.query(
            TableName=self.table_name,
            KeyConditionExpression="pk = :pk AND begins_with(sk, :prefix)",
            ExpressionAttributeValues={":pk": {"S": f"RUN#{run_id}"}, ":prefix": {"S": "CRED#"}},
            ConsistentRead=True,
        )
        for record in response.get("Items", []):
            self.client.update_item(
                TableName=self.table_name,
                Key={"pk": record["pk"], "sk": record["sk"]},
                UpdateExpression="SET #ttl = :ttl",
                ExpressionAttributeNames={"#ttl": TTL_ATTRIBUTE},
                ExpressionAttributeValues={":ttl": {"N": str(expires_at)}},
            )

    # --- delivery records -----------------------------------------------------------------------

    def _delivery_key(self, run_id: str, channel: str) -> dict[str, Any]:
        return {"pk": {"S": f"RUN#{run_id}"}, "sk": {"S": f"DELIVERY#{channel}"}}

    @staticmethod
    def _delivery_from_record(record: dict[str, Any]) -> Delivery:
        return Delivery(
            state=DeliveryState(record["state"]["S"]),
            holder=record["holder"]["S"],
            attempts=int(record["attempts"]["N"]),
            lease_until=datetime.fromtimestamp(int(record["lease_until"]["N"]), tz=UTC),
            updated_at=datetime.fromisoformat(record["updated_at"]["S"]),
            error=record["error"]["S"] if "error" in record else None,
        )

    def get_delivery(self, run_id: str, channel: str) -> Delivery | None:
        response = self.client.get_item(
            TableName=self.table_name, Key=self._delivery_key(run_id, channel), ConsistentRead=True
        )
        record = response.get("Item")
        return None if record is None else self._delivery_from_record(record)

    def claim_delivery(self, run_id: str, channel: str, *, lease_s: int) -> Delivery:
        """Take the lock for a non-idempotent delivery (e.g. Techcyte's results POST, which appends).

        Granted when nobody claimed it yet, when the last holder released it, or when the last
        holder's lease ran out (it crashed mid-post). The returned record's ``attempts`` counts this
        claim: above 1, an earlier holder may have delivered without recording it, so look at the
        peer before sending again. Raises ``DeliveryBusyError`` while another holder's lease runs,
        ``DeliveryClosedError`` once the delivery was made or given up.
        """
        now = utcnow()
        holder = new_id()
        try:
            response = self.client.update_item(
                TableName=self.table_name,
                Key=self._delivery_key(run_id, channel),
                UpdateExpression=(
                    "SET #state = :posting, holder = :holder, lease_until = :until, updated_at = :now "
                    "REMOVE #error ADD attempts :one"
                ),
                ConditionExpression=(
                    "attribute_not_exists(pk) OR #state = :released OR (#state = :posting AND lease_until < :epoch)"
                ),
                ExpressionAttributeNames={"#state": "state", "#error": "error"},
                ExpressionAttributeValues={
                    ":posting": {"S": DeliveryState.POSTING.value},
                    ":released": {"S": DeliveryState.RELEASED.value},
                    ":holder": {"S": holder},
                    ":until": {"N": str(int(now.timestamp()) + lease_s)},
                    ":epoch": {"N": str(int(now.timestamp()))},
                    ":now": {"S": _iso(now)},
                    ":one": {"N": "1"},
                },
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if not _is_condition_failure(exc):
                raise
            current = self.get_delivery(run_id, channel)
            if current is None:  # removed between the two reads: try again
                return self.claim_delivery(run_id, channel, lease_s=lease_s)
            if current.state is DeliveryState.POSTING:
                raise DeliveryBusyError(current) from None
            raise DeliveryClosedError(current) from None
        return self._delivery_from_record(response["Attributes"])

    def _settle_delivery(self, run_id: str, channel: str, holder: str, state: DeliveryState, error: str | None) -> None:
        names = {"#state": "state"}
        values: dict[str, Any] = {
            ":state": {"S": state.value},
            ":holder": {"S": holder},
            ":now": {"S": _iso(utcnow())},
        }
        update = "SET #state = :state, updated_at = :now, lease_until = :zero"
        values[":zero"] = {"N": "0"}
        if error is not None:
            update += ", #error = :error"
            names["#error"] = "error"
            values[":error"] = {"S": error[:1000]}
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key=self._delivery_key(run_id, channel),
                UpdateExpression=update,
                ConditionExpression="holder = :holder",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if _is_condition_failure(exc):
                raise ConflictError(f"delivery {channel} of run {run_id} was taken over by another holder") from exc
            raise

    def finish_delivery(
        self, run_id: str, channel: str, holder: str, *, delivered: bool, error: str | None = None
    ) -> None:
        """Close the delivery for good: made (``delivered``) or given up (a permanent refusal)."""
        state = DeliveryState.DELIVERED if delivered else DeliveryState.FAILED
        self._settle_delivery(run_id, channel, holder, state, error)

    def release_delivery(self, run_id: str, channel: str, holder: str, *, error: str) -> None:
        """Give the lock back after a transient failure, so that a retry may claim it at once."""
        self._settle_delivery(run_id, channel, holder, DeliveryState.RELEASED, error)

    # --- deadlines ----------------------------------------------------------------------------
    #
    # A run with a ``scheduling.deadline`` gets one more record, written in the same transaction as
    # the run: pk ``RUN#<id>``, sk ``DEADLINE``, gsi1 ``DEADLINES`` / ``<deadline>#<id>``. Only runs
    # with a deadline have it (a sparse set), so the scheduler's sweep finds the runs whose deadline
    # has passed with one gsi1 Query bounded by "now", never a scan, however many runs the table holds.
    # The sweep removes a record once its run has ended, so the set holds only pending deadlines and
    # deadlines passed since the last sweep.

    def due_deadlines(self, now: datetime) -> Iterator[str]:
        """The ids of runs whose deadline is at or before ``now`` and whose record the sweep has not removed."""
        return self._due(_DEADLINES_PARTITION, now)

    def _due(self, partition: str, now: datetime) -> Iterator[str]:
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "IndexName": "gsi1",
            # "<time>#<id>" < "<now>$" exactly when time <= now ("$" sorts right after "#").
            "KeyConditionExpression": "gsi1pk = :pk AND gsi1sk < :bound",
            "ExpressionAttributeValues": {
                ":pk": {"S": partition},
                ":bound": {"S": f"{_sortable_time(now)}$"},
            },
        }
        while True:
            response = self.client.query(**kwargs)
            for record in response.get("Items", []):
                yield record["run_id"]["S"]
            if "LastEvaluatedKey" not in response:
                return
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def forget_deadline(self, run_id: str) -> None:
        """Remove a run's deadline record (its run has ended, or was cancelled for it)."""
        self.client.delete_item(TableName=self.table_name, Key={"pk": {"S": f"RUN#{run_id}"}, "sk": {"S": "DEADLINE"}})

    # --- launches -----------------------------------------------------------------------------
    #
    # Every run is created with a launch record (pk ``RUN#<id>``, sk ``LAUNCH``, gsi1 ``LAUNCHES`` /
    # ``<submitted_at>#<id>``), removed once its job id is recorded. A Lambda that is cut short
    # between the two (its timeout while Batch hangs, a crash) would leave the run PENDING without a
    # job for good; the records still there some minutes after submission are exactly those runs
    # (and a few whose record outlived a recorded job id), found with one bounded gsi1 Query.

    def due_launches(self, submitted_before: datetime) -> Iterator[str]:
        """The ids of runs submitted at or before ``submitted_before`` whose launch record is still there."""
        return self._due(_LAUNCHES_PARTITION, submitted_before)

    def forget_launch(self, run_id: str) -> None:
        """Remove a run's launch record (its job id is recorded, or the run has ended)."""
        self.client.delete_item(TableName=self.table_name, Key={"pk": {"S": f"RUN#{run_id}"}, "sk": {"S": "LAUNCH"}})

    # --- listing ------------------------------------------------------------------------------

    def iter_runs(
        self, organization_id: str, *, newest_first: bool = True, first_page: int | None = None
    ) -> Iterator[Run]:
        """Runs of one organisation, by submission time (a query on gsi1, never a scan).

        ``first_page``: how many runs the caller expects to need. The first query reads that many,
        each further one twice as many as the last, so a caller that stops early reads (and pays
        for) little more than it uses. Without it each query reads DynamoDB's 1 MB.
        """
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "IndexName": "gsi1",
            "KeyConditionExpression": "gsi1pk = :org",
            "ExpressionAttributeValues": {":org": {"S": f"ORG#{organization_id}"}},
            "ScanIndexForward": not newest_first,
        }
        limit = max(first_page, 1) if first_page is not None else None
        while True:
            if limit is not None:
                kwargs["Limit"] = limit
                limit *= 2
            response = self.client.query(**kwargs)
            for record in response.get("Items", []):
                yield self._run_from_record(record)
            if "LastEvaluatedKey" not in response:
                return
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    # --- API tokens ---------------------------------------------------------------------------
    #
    # | record    | pk                 | sk             | gsi1pk           | gsi1sk                    |
    # |-----------|--------------------|----------------|------------------|---------------------------|
    # | API token | ``TOKEN#<sha256>`` | ``TOKEN``      | ``TOKENS#<org>`` | ``<created_at>#<sha256>`` |
    # | token org | ``TOKENORG#<org>`` | ``TOKENORG``   | ``TOKENORGS``    | ``<org>``                 |
    #
    # Only the token's SHA-256 is stored, with a short display prefix (too short to guess the rest).
    # gsi1 lists one organisation's tokens; the "token org" records list the organisations that have
    # tokens, so that listing every token is a few queries and never a scan of the whole table.

    def _token_records(
        self, token: str, *, user_id: str, organization_id: str, label: str | None, prefix: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        digest = hash_token(token)
        created_at = _iso(utcnow())
        record: dict[str, Any] = {
            "pk": {"S": f"TOKEN#{digest}"},
            "sk": {"S": "TOKEN"},
            "gsi1pk": {"S": f"TOKENS#{organization_id}"},
            "gsi1sk": {"S": f"{created_at}#{digest}"},
            "token_id": {"S": _token_id(digest)},
            "prefix": {"S": prefix},
            "user_id": {"S": user_id},
            "organization_id": {"S": organization_id},
            "created_at": {"S": created_at},
        }
        if label:
            record["label"] = {"S": label}
        org_record: dict[str, Any] = {
            "pk": {"S": f"TOKENORG#{organization_id}"},
            "sk": {"S": "TOKENORG"},
            "gsi1pk": {"S": "TOKENORGS"},
            "gsi1sk": {"S": organization_id},
        }
        return record, org_record

    def _put_token(self, record: dict[str, Any], org_record: dict[str, Any], condition: str) -> None:
        # One transaction: a token is never listed under an organisation that is not itself listed.
        self.client.transact_write_items(
            TransactItems=[
                {"Put": {"TableName": self.table_name, "Item": org_record}},
                {"Put": {"TableName": self.table_name, "Item": record, "ConditionExpression": condition}},
            ]
        )

    def register_api_token(
        self, token: str, *, user_id: str, organization_id: str, label: str | None = None
    ) -> ApiTokenInfo:
        """Store (the hash of) a given Platform API token bound to a user and organisation; idempotent.

        The local stack registers ``SLIDEBRIDGE_API_TOKEN`` this way. A revoked token stays revoked:
        registering it again raises IllegalTransitionError.
        """
        record, org_record = self._token_records(
            token, user_id=user_id, organization_id=organization_id, label=label, prefix=_display_prefix(token)
        )
        try:
            self._put_token(record, org_record, "attribute_not_exists(revoked_at)")
        except ClientError as exc:
            if _is_condition_failure(exc):
                raise IllegalTransitionError("this API token was revoked; it cannot be registered again") from exc
            raise
        return _token_info(record)

    def create_api_token(
        self, *, user_id: str, organization_id: str, label: str | None = None
    ) -> tuple[str, ApiTokenInfo]:
        """A new random API token: (the token in plain text, what is stored about it).

        The plain text exists only in the return value; the table keeps its hash.
        """
        if not user_id or not organization_id:
            raise ValueError("an API token needs a user and an organisation")
        # 32 random bytes (256 bits); the "sb_" marker lets secret scanners recognise a leaked token.
        token = _TOKEN_MARKER + secrets.token_urlsafe(32)
        record, org_record = self._token_records(
            token,
            user_id=user_id,
            organization_id=organization_id,
            label=label,
            prefix=token[: len(_TOKEN_MARKER) + _GENERATED_PREFIX_CHARS],
        )
        self._put_token(record, org_record, "attribute_not_exists(pk)")
        return token, _token_info(record)

    def _query_gsi1(self, partition: str) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "IndexName": "gsi1",
            "KeyConditionExpression": "gsi1pk = :pk",
            "ExpressionAttributeValues": {":pk": {"S": partition}},
        }
        while True:
            response = self.client.query(**kwargs)
            yield from response.get("Items", [])
            if "LastEvaluatedKey" not in response:
                return
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def list_api_tokens(self, organization_id: str | None) -> list[ApiTokenInfo]:
        """The tokens of one organisation (None: of every organisation), oldest first; revoked ones too.

        Queries on gsi1 only (one per organisation), never a scan of the table.
        """
        if organization_id is None:
            organizations = [record["gsi1sk"]["S"] for record in self._query_gsi1("TOKENORGS")]
        else:
            organizations = [organization_id]
        tokens = [
            _token_info(record)
            for organization in organizations
            for record in self._query_gsi1(f"TOKENS#{organization}")
        ]
        return sorted(tokens, key=lambda info: (info.created_at, info.token_id))

    def find_api_token(self, token_id_or_prefix: str) -> ApiTokenInfo:
        """The one token with this id, display prefix or plain text.

        Raises NotFoundError when none matches and ConflictError when a prefix matches several.
        """
        # The plain token itself (e.g. one that leaked): found by its hash without listing anything.
        response = self.client.get_item(
            TableName=self.table_name,
            Key={"pk": {"S": f"TOKEN#{hash_token(token_id_or_prefix)}"}, "sk": {"S": "TOKEN"}},
            ConsistentRead=True,
        )
        if "Item" in response:
            return _token_info(response["Item"])
        tokens = self.list_api_tokens(None)
        matches = [info for info in tokens if info.token_id == token_id_or_prefix]
        if not matches:
            matches = [info for info in tokens if info.prefix and info.prefix == token_id_or_prefix]
        if not matches:
            raise NotFoundError(f"no API token with id or prefix {token_id_or_prefix!r}")
        if len(matches) > 1:
            ids = ", ".join(info.token_id for info in matches)
            raise ConflictError(
                f"{len(matches)} API tokens have the prefix {token_id_or_prefix!r} ({ids}); give the id"
            )
        return matches[0]

    def revoke_api_token(self, token_id_or_prefix: str) -> ApiTokenInfo:
        """Revoke a token (see ``find_api_token``); ``authenticate`` refuses it from then on.

        Raises IllegalTransitionError when it was already revoked (the record keeps the first time).
        """
        info = self.find_api_token(token_id_or_prefix)
        if info.revoked_at is not None:
            raise IllegalTransitionError(f"API token {info.token_id} was already revoked at {_iso(info.revoked_at)}")
        try:
            response = self.client.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": f"TOKEN#{info.token_hash}"}, "sk": {"S": "TOKEN"}},
                UpdateExpression="SET revoked_at = :now",
                ConditionExpression="attribute_exists(pk) AND attribute_not_exists(revoked_at)",
                ExpressionAttributeValues={":now": {"S": _iso(utcnow())}},
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if _is_condition_failure(exc):
                raise IllegalTransitionError(f"API token {info.token_id} was revoked meanwhile") from exc
            raise
        return _token_info(response["Attributes"])

    def authenticate(self, token: str) -> Principal | None:
        response = self.client.get_item(
            TableName=self.table_name,
            Key={"pk": {"S": f"TOKEN#{hash_token(token)}"}, "sk": {"S": "TOKEN"}},
        )
        record = response.get("Item")
        if record is None or "revoked_at" in record:
            return None
        return Principal(user_id=record["user_id"]["S"], organization_id=record["organization_id"]["S"])


# --- API tokens (module level: the model and helpers of the section above) ------------------------------

_TOKEN_MARKER = "sb_"  # noqa: S105 - a public marker at the start of every generated token, not a secret
_GENERATED_PREFIX_CHARS = 6  # 36 bits of the token shown for recognition; 220 bits stay secret
_TOKEN_ID_CHARS = 16


class ApiTokenInfo(BaseModel):
    """What is stored about an API token: never the token itself."""

    token_id: str
    # Needed to address the record; left out of dumps (the CLI's JSON), as nobody needs to see it.
    token_hash: str = Field(exclude=True, repr=False)
    prefix: str
    user_id: str
    organization_id: str
    label: str | None = None
    created_at: datetime
    revoked_at: datetime | None = None


def _token_id(digest: str) -> str:
    # Part of the hash, not of the token: naming the token in logs or tickets reveals nothing.
    return digest[:_TOKEN_ID_CHARS]


def _display_prefix(token: str) -> str:
    # Tokens given from outside (SLIDEBRIDGE_API_TOKEN) may be short: never show more than a quarter.
    return token[: min(len(_TOKEN_MARKER) + _GENERATED_PREFIX_CHARS, len(token) // 4)]


def _token_info(record: dict[str, Any]) -> ApiTokenInfo:
    digest = record["pk"]["S"].removeprefix("TOKEN#")
    return ApiTokenInfo(
        token_id=record.get("token_id", {}).get("S") or _token_id(digest),
        token_hash=digest,
        prefix=record.get("prefix", {}).get("S", ""),
        user_id=record["user_id"]["S"],
        organization_id=record["organization_id"]["S"],
        label=record.get("label", {}).get("S"),
        created_at=datetime.fromisoformat(record["created_at"]["S"]),
        revoked_at=(datetime.fromisoformat(record["revoked_at"]["S"]) if "revoked_at" in record else None),
    )
