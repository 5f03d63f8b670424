"""Every SLIDEBRIDGE_* variable, in one place (no ``os.environ`` anywhere else).

The CDK stack sets these on each function and on the job definition; the local stack sets them
for its gateway process and the batch-job subprocesses it starts.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLIDEBRIDGE_", extra="ignore", frozen=True)

    # --- storage -----------------------------------------------------------------------------
    table_name: str = "slidebridge"
    bucket_name: str = "slidebridge-data"
    # S3 key prefixes: slides in transit are removed by a lifecycle rule sooner than artifacts.
    slides_prefix: str = "slides/"
    artifacts_prefix: str = "artifacts/"
    # Pathologists' corrections (Sectra modify), kept for model improvement.
    feedback_prefix: str = "feedback/"
    # Lifetime of a presigned artifact URL handed out by GET .../file (seconds).
    artifact_url_ttl_s: int = Field(default=900, ge=60, le=7 * 24 * 3600)
    # Days after which the bucket's lifecycle rule removes artifact files (infra artifacts_retention_days);
    # the Platform API then reports them DELETED_BY_SYSTEM and /file answers 410.
    artifacts_retention_days: int = Field(default=30, ge=1, le=3650)

    # --- jobs --------------------------------------------------------------------------------
    launcher: Literal["batch", "process"] = "batch"
    job_queue: str = "slidebridge-gpu"
    job_definition: str = "slidebridge-job"
    # Scratch space for slides in the job (the Batch launch template mounts a large volume here).
    scratch_dir: Path = Path("/tmp/slidebridge")  # noqa: S108 - overridden by the job definition
    # Tile-reading worker processes in the job; 0 = one per CPU core, at most 8.
    tile_workers: int = Field(default=0, ge=0, le=64)
    classifier_batch_size: int = Field(default=64, ge=1, le=4096)
    # Set by AWS Batch in array jobs and on retries; read here so nothing else touches the environment.
    batch_array_index: int | None = Field(
        default=None,
        validation_alias=AliasChoices("AWS_BATCH_JOB_ARRAY_INDEX", "SLIDEBRIDGE_BATCH_ARRAY_INDEX"),
    )
    batch_job_attempt: int = Field(
        default=1, validation_alias=AliasChoices("AWS_BATCH_JOB_ATTEMPT", "SLIDEBRIDGE_BATCH_JOB_ATTEMPT")
    )
    batch_max_attempts: int = Field(default=3, ge=1, le=10)

    # --- fetching ----------------------------------------------------------------------------
    # Comma-separated: "host", "host:port" or "http://host[:port]" (DESIGN §7).
    download_hosts: str = "127.0.0.1,localhost"
    sectra_callback_hosts: str = "127.0.0.1,localhost"
    download_part_size_mb: int = Field(default=16, ge=1, le=512)
    download_concurrency: int = Field(default=8, ge=1, le=64)
    http_timeout_s: float = Field(default=30.0, gt=0)
    ca_bundle: Path | None = None
    # CIDRs whose addresses a DNS name may resolve to although they are private (on-site Sectra
    # servers, S3 interface endpoints in the VPC). Comma-separated; empty = public addresses only.
    outbound_trusted_networks: str = ""

    # --- front doors -------------------------------------------------------------------------
    # Locally these come from the environment; in AWS the Lambda reads them from Secrets Manager
    # (the *_secret_arn settings) and these stay unset.
    sectra_webhook_key: SecretStr | None = None
    techcyte_webhook_key: SecretStr | None = None
    webhook_keys_secret_arn: str | None = None
    # A Platform API token the local stack registers at start (DESIGN §7).
    api_token: SecretStr | None = None
    default_organization_id: str = "default"

    techcyte_api_url: str = "https://api.app.techcyte.com/api/v3"
    techcyte_client_id: str | None = None
    techcyte_client_secret: SecretStr | None = None
    techcyte_credentials_secret_arn: str | None = None
    # Techcyte results (vendors/TECHCYTE.md §5): how our model is named in the AI results panel, the
    # tissue area below which a scan gets qcFailReasons ["insufficient_tissue"], and the class whose
    # share of the tissue is the headline (absent from the classifier: the tissue area is).
    techcyte_model_name: str = "slidebridge he-tissue"
    techcyte_provider: str = "slidebridge"
    techcyte_ruo: bool = True
    techcyte_min_tissue_mm2: float = Field(default=1.0, ge=0)
    techcyte_headline_class: str | None = "cellular"
    # Triage (PATCH /external/case): off unless a class is named. Score = the highest share of that
    # class over the task's scans (0..1); category "priority" at or above the threshold, else "routine".
    techcyte_triage_class: str | None = None
    techcyte_triage_threshold: float = Field(default=0.5, ge=0, le=1)
    # How long one job holds the "posting" lock before another may take over (must outlast a POST with
    # its retries and the case-evaluations check).
    techcyte_delivery_lease_s: int = Field(default=300, ge=10)

    # The public base URL of this deployment (API Gateway stage or custom domain), used to build the
    # registration URL Sectra's admin pastes in. Unset: derived from the request's Host header.
    public_url: str | None = None

    # --- Sectra -----------------------------------------------------------------------------------
    sectra_application_id: str = "he-tissue"
    sectra_display_name: str = "slidebridge H&E tissue"
    sectra_manufacturer: str = "slidebridge"
    sectra_input_type: Literal["wholeSlide", "taggedPolygon", "multiArea"] = "wholeSlide"
    # Registration context, echoed by Sectra on every call: {"output": "patches"} for a patch gallery,
    # {"autoRun": true} to analyse every newly imported slide. JSON text.
    sectra_context: str = "{}"
    # Progress upserts at these percentages of tiles done.
    sectra_progress_steps: str = "25,50,75"
    # The callback token is kept this long after the run ends, then DynamoDB's TTL removes it.
    credential_ttl_after_run_s: int = Field(default=3600, ge=0)

    # --- scheduling ------------------------------------------------------------------------------
    # How often the local stack looks for runs past their deadline (in AWS an EventBridge schedule
    # calls the scheduler Lambda instead; the job also checks before each item).
    deadline_sweep_interval_s: float = Field(default=5.0, gt=0, le=3600)
    # A run still without a job this long after its submission was left by a request that was cut
    # short (a Lambda timeout while Batch hung): the same sweep ends it SYSTEM_ERROR and tells the
    # vendor. Far longer than any API Lambda may run.
    launch_grace_s: int = Field(default=600, ge=60)

    # --- application -------------------------------------------------------------------------
    default_application_id: str = "he-tissue"
    default_application_version: str = "1.0.0"

    # --- logging -----------------------------------------------------------------------------
    log_level: str = "INFO"

    @field_validator("techcyte_client_id", "techcyte_headline_class", "techcyte_triage_class", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # The deployed secret holds "" until an operator stores the real client id.
        return None if value == "" else value

    def allowlist(self, value: str) -> list[str]:
        return [entry.strip() for entry in value.split(",") if entry.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once (tests call ``get_settings.cache_clear()``)."""
    return Settings()
