"""Platform API (Aignostics v1 shapes): wire models and the domain operations behind the routes.

Requests are parsed leniently where the SDK is lenient (explicit nulls, unknown fields ignored);
responses are strict models whose field names, enums and nullability follow the 1.6.0 client
(vendors/PLATFORM_API.md §3–§5), because that client is what parses them.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

from slidebridge.applications import (
    APPLICATIONS,
    MIME_TYPE_PATTERN,
    SEMVER_PATTERN,
    Application,
    ApplicationVersion,
    get_application,
    semver_key,
)
from slidebridge.artifacts import ArtifactStore
from slidebridge.checksums import crc32c_of_bytes
from slidebridge.errors import (
    ArtifactGoneError,
    IllegalTransitionError,
    MetadataSchemaError,
    NotFoundError,
    PreconditionFailedError,
    UrlNotAllowedError,
    ValidationFailedError,
)
from slidebridge.jobs import cancel_run, submit_run_job
from slidebridge.launcher import JobLauncher
from slidebridge.listing import (
    APPLICATION_SORT_FIELDS,
    ITEM_SORT_FIELDS,
    RUN_SORT_FIELDS,
    ListQuery,
    QueryParams,
    SortKey,
    last_value,
    parse_enum,
    split_values,
)
from slidebridge.metadata_filter import MetadataFilter, parse_metadata_filter
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
    utcnow,
)
from slidebridge.settings import Settings
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
    """``due_date``: when the caller would like the results; ``deadline``: unfinished by then, the run is
    cancelled by the system (``CANCELED_BY_SYSTEM``). A time without an offset is read as UTC."""

    model_config = ConfigDict(extra="ignore")

    due_date: datetime | None = None
    deadline: datetime | None = None

    @field_validator("due_date", "deadline")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @model_validator(mode="after")
    def _consistent(self) -> SchedulingRequest:
        # A run whose deadline has passed could only be cancelled at once: refuse it instead.
        if self.deadline is not None and self.deadline <= utcnow():
            raise ValueError("deadline must be in the future")
        if self.due_date is not None and self.deadline is not None and self.due_date > self.deadline:
            raise ValueError("due_date must not be later than deadline")
        return self


class RunCreationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    application_id: StrictStr
    version_number: StrictStr | None = None
    custom_metadata: dict[str, Any] | None = None
    scheduling: SchedulingRequest | None = None
    callback_context: dict[str, Any] | None = None
    items: list[ItemCreationRequest] = Field(min_length=1)


class CustomMetadataUpdateRequest(BaseModel):
    """PUT semantics: the new metadata replaces the old (``null`` or absent clears it). A non-null
    ``custom_metadata_checksum`` must equal the stored metadata's checksum (else 412)."""

    model_config = ConfigDict(extra="ignore")

    custom_metadata: dict[str, Any] | None = None
    custom_metadata_checksum: StrictStr | None = None


# --- responses (what we send: strict, exact names) ---------------------------------------------


class _Response(BaseModel):
    # Every field is always sent, defaults included: the OpenAPI document says so too.
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


class RunCreationResponse(_Response):
    run_id: str


class ApplicationVersionResponse(_Response):
    number: str = Field(pattern=SEMVER_PATTERN)
    released_at: datetime


class ApplicationReadShortResponse(_Response):
    application_id: str
    name: str
    description: str
    regulatory_classes: list[str]
    latest_version: ApplicationVersionResponse | None


class ApplicationReadResponse(_Response):
    application_id: str
    name: str
    description: str
    regulatory_classes: list[str]
    versions: list[ApplicationVersionResponse]


class InputArtifactDefinitionResponse(_Response):
    name: str
    mime_type: str = Field(pattern=MIME_TYPE_PATTERN)
    metadata_schema: dict[str, Any]


class OutputArtifactDefinitionResponse(_Response):
    name: str
    mime_type: str = Field(pattern=MIME_TYPE_PATTERN)
    metadata_schema: dict[str, Any]
    scope: Literal["ITEM", "GLOBAL"]
    visibility: Literal["INTERNAL", "EXTERNAL"]


class VersionReadResponse(_Response):
    version_number: str = Field(pattern=SEMVER_PATTERN)
    changelog: str
    input_artifacts: list[InputArtifactDefinitionResponse]
    output_artifacts: list[OutputArtifactDefinitionResponse]
    released_at: datetime


class CustomMetadataUpdateResponse(_Response):
    custom_metadata_checksum: str | None


class UserReadResponse(_Response):
    id: str
    email: str | None = None
    email_verified: bool | None = None
    name: str | None = None
    given_name: str | None = None
    family_name: str | None = None
    nickname: str | None = None
    picture: str | None = None
    updated_at: datetime | None = None


class OrganizationReadResponse(_Response):
    id: str
    name: str | None
    display_name: str | None
    # Required non-null by the client; Aignostics hands out its bucket and telemetry credentials here.
    # We have none to give (callers upload to their own storage): always "".
    aignostics_bucket_hmac_access_key_id: str = ""
    aignostics_bucket_hmac_secret_access_key: str = ""
    aignostics_bucket_name: str = ""
    aignostics_bucket_protocol: str = ""
    aignostics_logfire_token: str = ""
    aignostics_sentry_dsn: str = ""


class MeReadResponse(_Response):
    user: UserReadResponse
    organization: OrganizationReadResponse


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


def application_view(app: Application) -> ApplicationReadResponse:
    """One application with all its versions, newest (highest SemVer) first."""
    versions = sorted(app.versions, key=lambda v: semver_key(v.version_number), reverse=True)
    return ApplicationReadResponse(
        application_id=app.application_id,
        name=app.name,
        description=app.description,
        regulatory_classes=app.regulatory_classes,
        versions=[ApplicationVersionResponse(number=v.version_number, released_at=v.released_at) for v in versions],
    )


def version_view(version: ApplicationVersion) -> VersionReadResponse:
    return VersionReadResponse(
        version_number=version.version_number,
        changelog=version.changelog,
        input_artifacts=[
            InputArtifactDefinitionResponse(name=d.name, mime_type=d.mime_type, metadata_schema=d.metadata_schema)
            for d in version.input_artifacts
        ],
        output_artifacts=[
            OutputArtifactDefinitionResponse(
                name=d.name,
                mime_type=d.mime_type,
                metadata_schema=d.metadata_schema,
                scope=d.scope,
                visibility=d.visibility,
            )
            for d in version.output_artifacts
        ],
        released_at=version.released_at,
    )


def read_application(application_id: str) -> ApplicationReadResponse:
    """``GET /applications/{id}``; NotFoundError (404) for an unknown application."""
    return application_view(get_application(application_id))


def read_version(application_id: str, version_number: str) -> VersionReadResponse:
    """``GET /applications/{id}/versions/{version}``; NotFoundError (404) for an unknown application or version."""
    return version_view(get_application(application_id).version(version_number))


def me_view(principal: Principal) -> MeReadResponse:
    """``GET /me``: the user and organisation the caller's API token is bound to."""
    return MeReadResponse(
        user=UserReadResponse(id=principal.user_id),
        organization=OrganizationReadResponse(
            id=principal.organization_id, name=principal.organization_id, display_name=None
        ),
    )


def custom_metadata_checksum(metadata: dict[str, Any] | None) -> str | None:
    """The checksum clients send back to update metadata only if nobody changed it since they read it.

    CRC-32C, as 8 hex digits, of the metadata's canonical JSON (keys sorted, no spaces, UTF-8), so it
    depends only on the value; None for no metadata. Opaque to clients.
    """
    if metadata is None:
        return None
    canonical = json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{crc32c_of_bytes(canonical.encode()):08x}"


def _check_checksum(current: dict[str, Any] | None, expected: str | None, what: str) -> None:
    if expected is not None and expected != custom_metadata_checksum(current):
        raise PreconditionFailedError(
            f"the custom metadata of {what} has changed since it was read (checksum {expected} is stale); "
            "read it again and retry"
        )


def list_applications(query: ListQuery | None = None) -> list[ApplicationReadShortResponse]:
    """One page of the applications, by ``application_id`` unless ``query`` sorts otherwise."""
    query = query or ListQuery()
    apps = sorted(APPLICATIONS.values(), key=lambda a: a.application_id)
    return [application_short(app) for app in query.apply(apps, _field, tiebreak=lambda a: a.application_id)]


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
        custom_metadata_checksum=custom_metadata_checksum(run.custom_metadata),
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


def with_expired_artifacts(item: Item, *, retention: timedelta, now: datetime) -> Item:
    """``item`` with its AVAILABLE artifacts shown as DELETED_BY_SYSTEM once ``retention`` has passed.

    The reference platform deletes artifacts automatically 30 days after the run ends; here an S3
    lifecycle rule does, counting from each file's upload, just before the item ended. S3 removes an
    expired object some hours later (at the next midnight UTC, then asynchronously), so from the
    item's end + ``retention`` on the file is called gone: a 410 rather than a URL that may 404.
    Nothing is written: the view changes as time passes, with no sweep to run.
    """
    if item.terminated_at is None or now < item.terminated_at + retention:
        return item
    if not any(a.output is ArtifactOutput.AVAILABLE for a in item.output_artifacts):
        return item
    artifacts = [
        a.model_copy(update={"output": ArtifactOutput.DELETED_BY_SYSTEM}) if a.output is ArtifactOutput.AVAILABLE else a
        for a in item.output_artifacts
    ]
    return item.model_copy(update={"output_artifacts": artifacts})


def item_view(item: Item) -> ItemResultReadResponse:
    return ItemResultReadResponse(
        item_id=item.item_id,
        external_id=item.external_id,
        custom_metadata=item.custom_metadata,
        custom_metadata_checksum=custom_metadata_checksum(item.custom_metadata),
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


# --- list queries (PLATFORM_API.md §2, §6–§8) ------------------------------------------------------


# The two orders the store reads an organisation's runs in (gsi1, by submission time).
_NEWEST_FIRST = SortKey(field="submitted_at", descending=True)
_OLDEST_FIRST = SortKey(field="submitted_at", descending=False)


def _field(record: Any, name: str) -> Any:
    # Every sort field of §7 is an attribute of the same name on Run, Item and Application.
    return getattr(record, name)


def _scalar(params: QueryParams, name: str) -> str | None:
    """A scalar filter; an empty value (``?application_id=``) means no filter."""
    return last_value(params, name) or None


def _metadata_filter(params: QueryParams) -> MetadataFilter | None:
    raw = _scalar(params, "custom_metadata")
    return parse_metadata_filter(raw) if raw is not None else None


def _normalised_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return value  # not a UUID: matches no item, which is the honest answer


def application_list_query(params: QueryParams) -> ListQuery:
    """``GET /applications``: ``page``, ``page-size`` (or ``page_size``) and ``sort``."""
    return ListQuery.from_params(params, APPLICATION_SORT_FIELDS)


@dataclass(frozen=True)
class RunListQuery:
    """``GET /runs``: filters, order and page. Raises ``ListQueryError`` (422) from ``from_params``."""

    listing: ListQuery
    application_id: str | None = None
    application_version: str | None = None
    external_id: str | None = None
    custom_metadata: MetadataFilter | None = None
    # Newer clients' extras: "me" (or a user id) narrows to one submitter; for_organization must be
    # the caller's own organisation (another one answers 404, as an unknown one would).
    submitted_by: str | None = None
    for_organization: str | None = None

    @classmethod
    def from_params(cls, params: QueryParams) -> RunListQuery:
        return cls(
            listing=ListQuery.from_params(params, RUN_SORT_FIELDS),
            application_id=_scalar(params, "application_id"),
            application_version=_scalar(params, "application_version"),
            external_id=_scalar(params, "external_id"),
            custom_metadata=_metadata_filter(params),
            submitted_by=_scalar(params, "submitted_by"),
            for_organization=_scalar(params, "for_organization"),
        )

    def matches(self, run: Run, *, submitted_by: str | None) -> bool:
        """The filters that need only the run record (``external_id`` needs its items)."""
        return (
            (self.application_id is None or run.application_id == self.application_id)
            and (self.application_version is None or run.version_number == self.application_version)
            and (submitted_by is None or run.submitted_by == submitted_by)
            and (self.custom_metadata is None or self.custom_metadata.matches(run.custom_metadata))
        )


@dataclass(frozen=True)
class ItemListQuery:
    """``GET /runs/{id}/items``: filters, order and page. Raises ``ListQueryError`` (422) from ``from_params``."""

    listing: ListQuery
    item_ids: frozenset[str] | None = None
    external_ids: frozenset[str] | None = None
    state: ItemState | None = None
    termination_reason: ItemTerminationReason | None = None
    custom_metadata: MetadataFilter | None = None

    @classmethod
    def from_params(cls, params: QueryParams) -> ItemListQuery:
        item_ids = split_values(params, "item_id__in")
        external_ids = split_values(params, "external_id__in")
        return cls(
            listing=ListQuery.from_params(params, ITEM_SORT_FIELDS),
            item_ids=frozenset(_normalised_id(v) for v in item_ids) if item_ids else None,
            external_ids=frozenset(external_ids) if external_ids else None,
            state=parse_enum(params, "state", ItemState),
            termination_reason=parse_enum(params, "termination_reason", ItemTerminationReason),
            custom_metadata=_metadata_filter(params),
        )

    def matches(self, item: Item) -> bool:
        return (
            (self.item_ids is None or item.item_id in self.item_ids)
            and (self.external_ids is None or item.external_id in self.external_ids)
            and (self.state is None or item.state is self.state)
            # Only TERMINATED items have a reason, so this also excludes open items.
            and (self.termination_reason is None or item.termination_reason is self.termination_reason)
            and (self.custom_metadata is None or self.custom_metadata.matches(item.custom_metadata))
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
        artifacts_retention: timedelta = timedelta(days=30),
        settings: Settings | None = None,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.launcher = launcher
        self.policy = policy
        self.artifact_url_ttl_s = artifact_url_ttl_s
        # The S3 lifecycle removes artifact files this long after they are written (infra's
        # artifacts_retention_days); past it the API says so instead of handing out dead URLs.
        self.artifacts_retention = artifacts_retention
        # For cancelling: vendor runs' results (Techcyte) and credential expiry need the settings.
        self.settings = settings

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
                # The validator the schema's "$schema" names, as the SDK's jsonschema.validate picks it.
                validator = jsonschema.validators.validator_for(definition.metadata_schema)(definition.metadata_schema)
                error = jsonschema.exceptions.best_match(validator.iter_errors(artifact.metadata))
                if error is not None:
                    path = list(error.absolute_path)
                    if error.validator == "required" and isinstance(error.validator_value, list):
                        # jsonschema reports a missing key at the object; name the key itself.
                        missing = [k for k in error.validator_value if k not in (error.instance or {})]
                        path += missing[:1]
                    field = ".".join(str(p) for p in path) or "metadata"
                    raise MetadataSchemaError(
                        f"items[{index}] (external_id {item_request.external_id!r}): input artifact "
                        f"{artifact.name!r}: metadata field {field}: {error.message}",
                        loc=(*a_loc, "metadata", *path),
                        input_value=error.instance,
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

    def list_runs(self, principal: Principal, query: RunListQuery) -> list[Run]:
        """One page of the runs of the caller's organisation that pass ``query``'s filters.

        Reads the organisation's runs with a gsi1 query, which gives them in submission order, never a
        table scan. In the default order (newest first) and sorted by ``submitted_at`` either way
        (the SDK always asks for ``-submitted_at``), the query stops once the page is full; any
        other ``sort`` reads them all. Items are read (for ``external_id``) only for runs that passed
        every other filter.
        """
        if query.for_organization is not None and query.for_organization != principal.organization_id:
            raise NotFoundError(f"organization {query.for_organization} not found")
        submitted_by = principal.user_id if query.submitted_by == "me" else query.submitted_by
        listing = query.listing
        newest_first = listing.sort[:1] != (_OLDEST_FIRST,)
        arrival = _NEWEST_FIRST if newest_first else _OLDEST_FIRST
        stored = self.store.iter_runs(
            principal.organization_id,
            newest_first=newest_first,
            first_page=listing.end if listing.reads_early_part(arrival) else None,
        )
        runs: Iterator[Run] = (run for run in stored if query.matches(run, submitted_by=submitted_by))
        if query.external_id is not None:
            external_id = query.external_id
            runs = (run for run in runs if self._has_item(run.run_id, external_id))
        return listing.apply(runs, _field, tiebreak=lambda run: run.run_id, arrival=arrival)

    def _has_item(self, run_id: str, external_id: str) -> bool:
        return any(item.external_id == external_id for item in self.store.list_items(run_id))

    def list_run_items(self, principal: Principal, run_id: str, query: ItemListQuery) -> list[Item]:
        """One page of a visible run's items that pass ``query``'s filters; by default in submission order.

        Ties in a ``sort`` fall back to the submission index, which is unique within the run.
        """
        self.get_visible_run(principal, run_id)
        items = (item for item in self._items(run_id) if query.matches(item))
        return query.listing.apply(items, _field, tiebreak=lambda item: item.index)

    def get_item_by_external_id(self, principal: Principal, run_id: str, external_id: str) -> Item:
        self.get_visible_run(principal, run_id)
        for item in self._items(run_id):
            if item.external_id == external_id:
                return item
        raise NotFoundError(f"run {run_id} has no item {external_id!r}")

    def _items(self, run_id: str) -> Iterator[Item]:
        """The run's items as the API shows them: artifacts past retention are DELETED_BY_SYSTEM."""
        now = utcnow()
        for item in self.store.list_items(run_id):
            yield with_expired_artifacts(item, retention=self.artifacts_retention, now=now)

    def artifact_url(self, principal: Principal, run_id: str, artifact_id: str) -> str:
        """A short-lived presigned URL for one output artifact of a visible run."""
        self.get_visible_run(principal, run_id)
        for item in self._items(run_id):
            for artifact in item.output_artifacts:
                if artifact.output_artifact_id != artifact_id:
                    continue
                if artifact.output in (ArtifactOutput.DELETED_BY_USER, ArtifactOutput.DELETED_BY_SYSTEM):
                    raise ArtifactGoneError(f"artifact {artifact_id} was deleted ({artifact.output.value})")
                if artifact.output is not ArtifactOutput.AVAILABLE:
                    raise NotFoundError(f"artifact {artifact_id} has no file ({artifact.output.value})")
                return self.artifacts.presigned_get(artifact.s3_key, self.artifact_url_ttl_s)
        raise NotFoundError(f"artifact {artifact_id} not found in run {run_id}")

    def cancel(self, principal: Principal, run_id: str) -> Run:
        """``POST /runs/{id}/cancel``: stop the job; open items end SKIPPED, finished ones keep their artifacts.

        IllegalTransitionError (409) once the run has terminated, cancelled or not.
        """
        run = self.get_visible_run(principal, run_id)
        if run.state is RunState.TERMINATED:
            how = "cancelled" if run.termination_reason is not RunTerminationReason.ALL_ITEMS_PROCESSED else "finished"
            raise IllegalTransitionError(f"run {run_id} is already {how} ({run.termination_reason})")
        return cancel_run(
            self.store,
            self.launcher,
            run_id,
            reason=f"cancelled by user {principal.user_id}",
            credential_ttl_after_run_s=self.settings.credential_ttl_after_run_s if self.settings else None,
            settings=self.settings,
        )

    def delete_artifacts(self, principal: Principal, run_id: str) -> None:
        """``DELETE /runs/{id}/artifacts``: remove a terminated run's output files for good.

        The artifacts then report ``DELETED_BY_USER`` and ``/file`` answers 410. They are marked before
        the objects go, so no URL to a vanishing object is handed out; a repeated call deletes again
        (a retry after a failure in between). IllegalTransitionError (409) while the run is open.
        """
        run = self.get_visible_run(principal, run_id)
        if run.state is not RunState.TERMINATED:
            raise IllegalTransitionError(
                f"run {run_id} is {run.state.value}: artifacts can be deleted once it has terminated (cancel it first)"
            )
        gone = (ArtifactOutput.AVAILABLE, ArtifactOutput.DELETED_BY_USER)

        def mark_deleted(item: Item) -> Item | None:
            if not any(a.output is ArtifactOutput.AVAILABLE for a in item.output_artifacts):
                return None
            artifacts = [
                a.model_copy(update={"output": ArtifactOutput.DELETED_BY_USER})
                if a.output is ArtifactOutput.AVAILABLE
                else a
                for a in item.output_artifacts
            ]
            return item.model_copy(update={"output_artifacts": artifacts})

        keys: list[str] = []
        for item in self.store.list_items(run_id):
            if not any(a.output in gone for a in item.output_artifacts):
                continue
            updated = self.store.update_item(run_id, item.index, mark_deleted)
            keys.extend(a.s3_key for a in updated.output_artifacts if a.output is ArtifactOutput.DELETED_BY_USER)
        self.artifacts.delete(keys)
        logger.info("deleted %d artifact files of run %s", len(keys), run_id)

    def put_run_custom_metadata(
        self, principal: Principal, run_id: str, request: CustomMetadataUpdateRequest
    ) -> str | None:
        """Replace a visible run's custom metadata; returns the new checksum.

        PreconditionFailedError (412) when ``custom_metadata_checksum`` is given and no longer matches.
        The check and the write are one version-conditioned update: a concurrent writer in between
        makes it re-read and check again, so a stale checksum can never overwrite.
        """
        self.get_visible_run(principal, run_id)

        def change(run: Run) -> Run:
            _check_checksum(run.custom_metadata, request.custom_metadata_checksum, f"run {run_id}")
            return run.model_copy(update={"custom_metadata": request.custom_metadata})

        return custom_metadata_checksum(self.store.update_run(run_id, change).custom_metadata)

    def put_item_custom_metadata(
        self, principal: Principal, run_id: str, external_id: str, request: CustomMetadataUpdateRequest
    ) -> str | None:
        """Replace one item's custom metadata (the item named by its ``external_id``); as for runs."""
        item = self.get_item_by_external_id(principal, run_id, external_id)

        def change(current: Item) -> Item:
            _check_checksum(
                current.custom_metadata, request.custom_metadata_checksum, f"item {external_id!r} of run {run_id}"
            )
            return current.model_copy(update={"custom_metadata": request.custom_metadata})

        return custom_metadata_checksum(self.store.update_item(run_id, item.index, change).custom_metadata)
