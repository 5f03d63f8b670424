"""Runs, items and output artifacts in the Platform API's vocabulary (vendors/PLATFORM_API.md §5).

The state machine lives here, free of storage: ``RunStore`` applies these transitions with
conditional writes, so the rules below hold even with concurrent writers.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slidebridge.errors import IllegalTransitionError


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class RunState(StrEnum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    TERMINATED = "TERMINATED"


class RunOutput(StrEnum):
    NONE = "NONE"
    PARTIAL = "PARTIAL"
    FULL = "FULL"


class RunTerminationReason(StrEnum):
    ALL_ITEMS_PROCESSED = "ALL_ITEMS_PROCESSED"
    CANCELED_BY_SYSTEM = "CANCELED_BY_SYSTEM"
    CANCELED_BY_USER = "CANCELED_BY_USER"


class ItemState(StrEnum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    TERMINATED = "TERMINATED"


class ItemOutput(StrEnum):
    # No PARTIAL for items: the client rejects it.
    NONE = "NONE"
    FULL = "FULL"


class ItemTerminationReason(StrEnum):
    SUCCEEDED = "SUCCEEDED"
    USER_ERROR = "USER_ERROR"
    SYSTEM_ERROR = "SYSTEM_ERROR"
    SKIPPED = "SKIPPED"


ArtifactState = ItemState
ArtifactTerminationReason = ItemTerminationReason


class ArtifactOutput(StrEnum):
    NONE = "NONE"
    AVAILABLE = "AVAILABLE"
    DELETED_BY_USER = "DELETED_BY_USER"
    DELETED_BY_SYSTEM = "DELETED_BY_SYSTEM"


class RunSource(StrEnum):
    PLATFORM = "platform"
    SECTRA = "sectra"
    TECHCYTE = "techcyte"


# --- transitions -------------------------------------------------------------------------------

# Item: a retried job may hand an item back (PROCESSING → PENDING); TERMINATED is final.
ITEM_TRANSITIONS: dict[ItemState, frozenset[ItemState]] = {
    ItemState.PENDING: frozenset({ItemState.PROCESSING, ItemState.TERMINATED}),
    ItemState.PROCESSING: frozenset({ItemState.PENDING, ItemState.TERMINATED}),
    ItemState.TERMINATED: frozenset(),
}

# Run: PROCESSING → PENDING happens when no item is processing any more (PLATFORM_API.md §5).
RUN_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.PENDING: frozenset({RunState.PROCESSING, RunState.TERMINATED}),
    RunState.PROCESSING: frozenset({RunState.PENDING, RunState.TERMINATED}),
    RunState.TERMINATED: frozenset(),
}


def check_item_transition(current: ItemState, target: ItemState) -> None:
    if target not in ITEM_TRANSITIONS[current]:
        raise IllegalTransitionError(f"item cannot go from {current} to {target}")


def check_run_transition(current: RunState, target: RunState) -> None:
    if target not in RUN_TRANSITIONS[current]:
        raise IllegalTransitionError(f"run cannot go from {current} to {target}")


# --- models ------------------------------------------------------------------------------------


class RunStatistics(BaseModel):
    """The seven item counters; the last four count TERMINATED items by reason."""

    model_config = ConfigDict(extra="forbid")

    item_count: int = 0
    item_pending_count: int = 0
    item_processing_count: int = 0
    item_user_error_count: int = 0
    item_system_error_count: int = 0
    item_skipped_count: int = 0
    item_succeeded_count: int = 0

    @staticmethod
    def counter_for(state: ItemState, reason: ItemTerminationReason | None) -> str:
        """The counter an item in this state (and termination reason) is counted in."""
        if state is ItemState.PENDING:
            return "item_pending_count"
        if state is ItemState.PROCESSING:
            return "item_processing_count"
        if reason is None:
            raise IllegalTransitionError("a TERMINATED item needs a termination reason")
        return f"item_{reason.value.lower()}_count"

    @classmethod
    def of_items(cls, items: list[Item]) -> RunStatistics:
        stats = cls(item_count=len(items))
        for item in items:
            name = cls.counter_for(item.state, item.termination_reason)
            setattr(stats, name, getattr(stats, name) + 1)
        return stats

    @property
    def open_count(self) -> int:
        return self.item_pending_count + self.item_processing_count


class ArtifactMetadata(BaseModel):
    """What the SDK needs to download and verify an artifact (PLATFORM_API.md §4)."""

    model_config = ConfigDict(extra="allow")

    media_type: str
    size_bytes: int
    checksum_base64_crc32c: str


class InputArtifact(BaseModel):
    input_artifact_id: str = Field(default_factory=new_id)
    name: str
    download_url: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class OutputArtifact(BaseModel):
    output_artifact_id: str = Field(default_factory=new_id)
    name: str
    state: ItemState = ItemState.TERMINATED
    termination_reason: ItemTerminationReason | None = ItemTerminationReason.SUCCEEDED
    output: ArtifactOutput = ArtifactOutput.AVAILABLE
    metadata: ArtifactMetadata | None = None
    s3_key: str
    error_code: str | None = None
    error_message: str | None = None


class Item(BaseModel):
    run_id: str
    index: int = Field(ge=0)
    item_id: str = Field(default_factory=new_id)
    external_id: str
    state: ItemState = ItemState.PENDING
    output: ItemOutput = ItemOutput.NONE
    termination_reason: ItemTerminationReason | None = None
    error_code: str | None = None
    error_message: str | None = None
    terminated_at: datetime | None = None
    custom_metadata: dict[str, Any] | None = None
    input_artifacts: list[InputArtifact] = Field(default_factory=list)
    output_artifacts: list[OutputArtifact] = Field(default_factory=list)
    # Optimistic-concurrency counter: every write is conditional on the version it read.
    version: int = 0


class Scheduling(BaseModel):
    due_date: datetime | None = None
    deadline: datetime | None = None


class Run(BaseModel):
    run_id: str = Field(default_factory=new_id)
    application_id: str
    version_number: str
    source: RunSource = RunSource.PLATFORM
    organization_id: str
    submitted_by: str
    submitted_at: datetime = Field(default_factory=utcnow)
    state: RunState = RunState.PENDING
    termination_reason: RunTerminationReason | None = None
    error_code: str | None = None
    error_message: str | None = None
    terminated_at: datetime | None = None
    statistics: RunStatistics = Field(default_factory=RunStatistics)
    custom_metadata: dict[str, Any] | None = None
    scheduling: Scheduling | None = None
    # Vendor context (Sectra applicationId/slideId/…; Techcyte task_id/…); never credentials.
    vendor_context: dict[str, Any] = Field(default_factory=dict)
    job_id: str | None = None
    version: int = 0

    @property
    def output(self) -> RunOutput:
        """Derived from the counters: FULL when all items succeeded, PARTIAL when some did."""
        succeeded = self.statistics.item_succeeded_count
        if succeeded == 0:
            return RunOutput.NONE
        if succeeded == self.statistics.item_count:
            return RunOutput.FULL
        return RunOutput.PARTIAL
