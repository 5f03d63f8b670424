"""Platform API (Aignostics v1 shapes): wire models and the domain operations behind the routes.

Requests are parsed leniently where the SDK is lenient (explicit nulls, unknown fields ignored);
responses are strict models whose field names, enums and nullability follow the 1.6.0 client
(vendors/PLATFORM_API.md §3–§5), because that client is what parses them.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from slidebridge.applications import APPLICATIONS, Application, ApplicationVersion, get_application
from slidebridge.artifacts import ArtifactStore
from slidebridge.errors import NotFoundError, UrlNotAllowedError, ValidationFailedError
from slidebridge.jobs import submit_run_job
from slidebridge.launcher import JobLauncher
from slidebridge.outbound import OutboundPolicy, Purpose
from slidebridge.runs import (
    ArtifactOutput,
    InputArtifact,
    Item,
    ItemOutput,
    ItemState,
    ItemTerminationReason,
    Run,
    RunOutput,
    RunSource,
    RunState,
    RunStatistics,
    RunTerminationReason,
    Scheduling,
)
from slidebridge.store import Principal, RunStore

logger = logging.getLogger(__name__)

# --- requests (what clients send us: lenient about extras and explicit nulls) -------------------


class InputArtifactCreationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    download_url: StrictStr = Field(min_length=1, max_length=2083)
    metadata: dict[str, Any]


class ItemCreationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    external_id: StrictStr = Field(min_length=1, max_length=255)
    custom_metadata: dict[str, Any] | None = None
    input_artifacts: list[InputArtifactCreationRequest]


class SchedulingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    due_date: datetime | None = None
    deadline: datetime | None = None


class RunCreationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    application_id: StrictStr
    version_number: StrictStr | None = None
    custom_metadata: dict[str, Any] | None = None
    scheduling: SchedulingRequest | None = None
    callback_context: dict[str, Any] | None = None
    items: list[ItemCreationRequest] = Field(min_length=1)


# --- responses (what we send: strict, exact names) ---------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunCreationResponse(_Response):
    run_id: str


class ApplicationVersionResponse(_Response):
    number: str
    released_at: datetime


class ApplicationReadShortResponse(_Response):
    application_id: str
    name: str
    description: str
    regulatory_classes: list[str]
    latest_version: ApplicationVersionResponse | None


class SchedulingResponse(_Response):
    due_date: datetime | None
    deadline: datetime | None


class RunReadResponse(_Response):
    run_id: str
    application_id: str
    version_number: str
    state: RunState
    output: RunOutput
    termination_reason: RunTerminationReason | None
    error_code: str | None
    error_message: str | None
    statistics: RunStatistics
    custom_metadata: dict[str, Any] | None
    custom_metadata_checksum: str | None
    submitted_at: datetime
    submitted_by: str
    terminated_at: datetime | None
    num_preceding_items_org: int | None = None
    num_preceding_items_platform: int | None = None
    scheduling: SchedulingResponse | None
    organization_id: str | None


class InputArtifactReadResponse(_Response):
    input_artifact_id: str
    name: str
    metadata: dict[str, Any] | None
    # Never echo the caller's presigned URL back: it is a credential.
    download_url: str | None = None


class OutputArtifactResultReadResponse(_Response):
    output_artifact_id: str
    name: str
    metadata: dict[str, Any] | None
    state: ItemState
    termination_reason: ItemTerminationReason | None
    output: ArtifactOutput
    error_code: str | None
    error_message: str | None
    download_url: str | None = None  # deprecated: the SDK uses GET .../file


class ItemResultReadResponse(_Response):
    item_id: str
    external_id: str
    custom_metadata: dict[str, Any] | None
    custom_metadata_checksum: str | None
    queue_position_org: int | None = None
    queue_position_platform: int | None = None
    state: ItemState
    output: ItemOutput
    termination_reason: ItemTerminationReason | None
    error_code: str | None
    error_message: str | None
    terminated_at: datetime | None
    input_artifacts: list[InputArtifactReadResponse]
    output_artifacts: list[OutputArtifactResultReadResponse]


# --- views -------------------------------------------------------------------------------------


def application_short(app: Application) -> ApplicationReadShortResponse:
    latest = app.version(None)
    return ApplicationReadShortResponse(
        application_id=app.application_id,
        name=app.name,
        description=app.description,
        regulatory_classes=app.regulatory_classes,
        latest_version=ApplicationVersionResponse(number=latest.version_number, released_at=latest.released_at),
    )


def list_applications() -> list[ApplicationReadShortResponse]:
    return [application_short(app) for app in sorted(APPLICATIONS.values(), key=lambda a: a.application_id)]


def run_view(run: Run) -> RunReadResponse:
    return RunReadResponse(
        run_id=run.run_id,
        application_id=run.application_id,
        version_number=run.version_number,
        state=run.state,
        output=run.output,
        termination_reason=run.termination_reason,
        error_code=run.error_code,
        error_message=run.error_message,
        statistics=run.statistics,
        custom_metadata=run.custom_metadata,
        custom_metadata_checksum=None,
        submitted_at=run.submitted_at,
        submitted_by=run.submitted_by,
        terminated_at=run.terminated_at,
        scheduling=(
            SchedulingResponse(due_date=run.scheduling.due_date, deadline=run.scheduling.deadline)
            if run.scheduling
            else None
        ),
        organization_id=run.organization_id,
    )


def item_view(item: Item) -> ItemResultReadResponse:
    return ItemResultReadResponse(
        item_id=item.item_id,
        external_id=item.external_id,
        custom_metadata=item.custom_metadata,
        custom_metadata_checksum=None,
        state=item.state,
        output=item.output,
        termination_reason=item.termination_reason,
        error_code=item.error_code,
        error_message=item.error_message,
        terminated_at=item.terminated_at,
        input_artifacts=[
            InputArtifactReadResponse(input_artifact_id=a.input_artifact_id, name=a.name, metadata=a.metadata)
            for a in item.input_artifacts
        ],
        output_artifacts=[
            OutputArtifactResultReadResponse(
                output_artifact_id=a.output_artifact_id,
                name=a.name,
                metadata=a.metadata.model_dump() if a.metadata and a.output is ArtifactOutput.AVAILABLE else None,
                state=a.state,
                termination_reason=a.termination_reason,
                output=a.output,
                error_code=a.error_code,
                error_message=a.error_message,
            )
            for a in item.output_artifacts
        ],
    )


# --- operations --------------------------------------------------------------------------------


class PlatformService:
    """The Platform API's domain operations; the Lambda routes only parse and call these."""

    def __init__(
        self,
        store: RunStore,
        artifacts: ArtifactStore,
        launcher: JobLauncher,
        policy: OutboundPolicy,
        *,
        artifact_url_ttl_s: int,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.launcher = launcher
        self.policy = policy
        self.artifact_url_ttl_s = artifact_url_ttl_s

    def get_visible_run(self, principal: Principal, run_id: str) -> Run:
        run = self.store.get_run(run_id)
        if run.organization_id != principal.organization_id:
            # Same answer as a missing run: no probing of other organisations' ids.
            raise NotFoundError(f"run {run_id} not found")
        return run

    def create_run(self, principal: Principal, request: RunCreationRequest) -> Run:
        """Validate everything first, then store the run and its items and start the job."""
        app = get_application(request.application_id)
        version = app.version(request.version_number)
        items = self._validated_items(version, request)
        run = Run(
            application_id=app.application_id,
            version_number=version.version_number,
            source=RunSource.PLATFORM,
            organization_id=principal.organization_id,
            submitted_by=principal.user_id,
            custom_metadata=request.custom_metadata,
            scheduling=(
                Scheduling(due_date=request.scheduling.due_date, deadline=request.scheduling.deadline)
                if request.scheduling
                else None
            ),
        )
        for item in items:
            item.run_id = run.run_id
        run = self.store.create_run(run, items)
        submit_run_job(self.store, self.launcher, run, len(items))
        return run

    def _validated_items(self, version: ApplicationVersion, request: RunCreationRequest) -> list[Item]:
        definitions = {d.name: d for d in version.input_artifacts}
        seen: set[str] = set()
        items: list[Item] = []
        for index, item_request in enumerate(request.items):
            loc: tuple[str | int, ...] = ("body", "items", index)
            if item_request.external_id in seen:
                raise ValidationFailedError(
                    f"items[{index}]: external_id {item_request.external_id!r} is used twice in this run",
                    loc=(*loc, "external_id"),
                )
            seen.add(item_request.external_id)
            names = [a.name for a in item_request.input_artifacts]
            missing = sorted(set(definitions) - set(names))
            if missing:
                raise ValidationFailedError(
                    f"items[{index}]: missing input artifact(s) {', '.join(missing)}",
                    loc=(*loc, "input_artifacts"),
                )
            inputs: list[InputArtifact] = []
            for a_index, artifact in enumerate(item_request.input_artifacts):
                a_loc = (*loc, "input_artifacts", a_index)
                definition = definitions.get(artifact.name)
                if definition is None or artifact.name in names[:a_index]:
                    raise ValidationFailedError(
                        f"items[{index}]: unknown or repeated input artifact {artifact.name!r}; "
                        f"this version takes {', '.join(sorted(definitions))}",
                        loc=(*a_loc, "name"),
                    )
                error = jsonschema.exceptions.best_match(
                    jsonschema.Draft7Validator(definition.metadata_schema).iter_errors(artifact.metadata)
                )
                if error is not None:
                    field = ".".join(str(p) for p in error.absolute_path) or "metadata"
                    raise ValidationFailedError(
                        f"items[{index}] ({item_request.external_id}): metadata field {field}: {error.message}",
                        loc=(*a_loc, "metadata", *error.absolute_path),
                    )
                try:
                    self.policy.check(artifact.download_url, Purpose.DOWNLOAD)
                except UrlNotAllowedError as exc:
                    raise ValidationFailedError(
                        f"items[{index}] ({item_request.external_id}): download_url: {exc.message}",
                        loc=(*a_loc, "download_url"),
                    ) from exc
                inputs.append(
                    InputArtifact(name=artifact.name, download_url=artifact.download_url, metadata=artifact.metadata)
                )
            items.append(
                Item(
                    run_id="",
                    index=index,
                    external_id=item_request.external_id,
                    custom_metadata=item_request.custom_metadata,
                    input_artifacts=inputs,
                )
            )
        return items

    def get_item_by_external_id(self, principal: Principal, run_id: str, external_id: str) -> Item:
        self.get_visible_run(principal, run_id)
        for item in self.store.list_items(run_id):
            if item.external_id == external_id:
                return item
        raise NotFoundError(f"run {run_id} has no item {external_id!r}")

    def artifact_url(self, principal: Principal, run_id: str, artifact_id: str) -> str:
        """A short-lived presigned URL for one output artifact of a visible run."""
        self.get_visible_run(principal, run_id)
        for item in self.store.list_items(run_id):
            for artifact in item.output_artifacts:
                if artifact.output_artifact_id != artifact_id:
                    continue
                if artifact.output is not ArtifactOutput.AVAILABLE:
                    raise ArtifactGoneError(f"artifact {artifact_id} is {artifact.output.value}")
                return self.artifacts.presigned_get(artifact.s3_key, self.artifact_url_ttl_s)
        raise NotFoundError(f"artifact {artifact_id} not found in run {run_id}")


class ArtifactGoneError(NotFoundError):
    """The artifact existed but has been deleted (HTTP 410)."""
