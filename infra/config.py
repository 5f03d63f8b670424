"""Deployment configuration, read from CDK context (``cdk.json`` "context" and ``cdk synth -c key=value``).

Every key has a default, so a bare ``cdk synth`` works. ``-c`` values arrive as strings, so list fields
also accept ``"g4dn,g5"`` and numbers/booleans are parsed leniently. A bad value stops synth with an
``InfraConfigError`` that names the context key.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Any, Literal

import aws_cdk.aws_ec2 as ec2
import aws_cdk.aws_logs as logs
from constructs import Node
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# x86_64 NVIDIA GPU families only: the compute environment boots the ECS AL2023 NVIDIA AMI (x86_64) and
# the image ships CUDA builds of torch. Graviton (g5g) and AMD (g4ad) GPU families cannot run it.
GPU_INSTANCE_CLASSES: Mapping[str, ec2.InstanceClass] = {
    "g4dn": ec2.InstanceClass.G4DN,
    "g5": ec2.InstanceClass.G5,
    "g6": ec2.InstanceClass.G6,
    "g6e": ec2.InstanceClass.G6E,
    "gr6": ec2.InstanceClass.GR6,
    "g7e": ec2.InstanceClass.G7E,
    "p3": ec2.InstanceClass.P3,
    "p3dn": ec2.InstanceClass.P3DN,
    "p4d": ec2.InstanceClass.P4D,
    "p4de": ec2.InstanceClass.P4DE,
    "p5": ec2.InstanceClass.P5,
    "p5e": ec2.InstanceClass.P5E,
    "p5en": ec2.InstanceClass.P5EN,
}

# CloudWatch Logs accepts only these retention periods (days).
_LOG_RETENTION_DAYS: Mapping[int, logs.RetentionDays] = {
    1: logs.RetentionDays.ONE_DAY,
    3: logs.RetentionDays.THREE_DAYS,
    5: logs.RetentionDays.FIVE_DAYS,
    7: logs.RetentionDays.ONE_WEEK,
    14: logs.RetentionDays.TWO_WEEKS,
    30: logs.RetentionDays.ONE_MONTH,
    60: logs.RetentionDays.TWO_MONTHS,
    90: logs.RetentionDays.THREE_MONTHS,
    120: logs.RetentionDays.FOUR_MONTHS,
    150: logs.RetentionDays.FIVE_MONTHS,
    180: logs.RetentionDays.SIX_MONTHS,
    365: logs.RetentionDays.ONE_YEAR,
    400: logs.RetentionDays.THIRTEEN_MONTHS,
    545: logs.RetentionDays.EIGHTEEN_MONTHS,
    731: logs.RetentionDays.TWO_YEARS,
    1827: logs.RetentionDays.FIVE_YEARS,
    3653: logs.RetentionDays.TEN_YEARS,
}

# Entry grammar of SLIDEBRIDGE_*_HOSTS (DESIGN §7): "host", "host:port" or "http://host[:port]".
# A leading "*." (any subdomain, e.g. "*.s3.eu-west-1.amazonaws.com") is let through for outbound.py to judge.
_HOST_ENTRY = re.compile(r"^(http://)?(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class InfraConfigError(ValueError):
    """A CDK context value is invalid; the message names the context key."""


class InfraConfig(BaseModel):
    """Everything a deployment may choose. Field names are the CDK context keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Part of every physical name and the API stage name, so two stages can share an account.
    stage: str = Field(default="prod", pattern=r"^[a-z][a-z0-9-]{0,19}$")

    # --- batch -------------------------------------------------------------------------------
    instance_classes: tuple[str, ...] = ("g4dn", "g5", "g6")
    max_vcpus: int = Field(default=64, ge=4, le=10_000)
    spot: bool = True
    # "public": job instances get public IPs in public subnets (no NAT; inbound closed by the security
    # group). "private": private subnets behind one NAT gateway (about 35 USD/month plus per-GB fees).
    job_subnets: Literal["public", "private"] = "public"
    root_volume_gib: int = Field(default=200, ge=30, le=16_384)
    job_timeout_hours: float = Field(default=4.0, gt=0, le=336)
    # A job left RUNNABLE this long because no GPU capacity can be had is cancelled (job_events then
    # ends its items SYSTEM_ERROR) instead of waiting forever.
    capacity_wait_hours: float = Field(default=6.0, ge=0.25, le=24)

    # --- storage -----------------------------------------------------------------------------
    slides_retention_days: int = Field(default=7, ge=1, le=3650)
    artifacts_retention_days: int = Field(default=30, ge=1, le=3650)
    # Keep bucket, table and key when the stack is deleted (production); False destroys them (dev).
    retain_data: bool = True

    # --- outbound allowlists and vendors ------------------------------------------------------
    download_hosts: str = ""
    sectra_callback_hosts: str = ""
    # CIDRs that download/callback hosts may resolve to although private (on-site Sectra servers).
    outbound_trusted_networks: str = ""
    techcyte_api_url: str = "https://api.app.techcyte.com/api/v3"
    # An existing Secrets Manager secret {"client_id", "client_secret"}; unset creates a placeholder.
    techcyte_credentials_secret_arn: str | None = Field(
        default=None, pattern=r"^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:.+-[A-Za-z0-9]{6}$"
    )

    # --- API ---------------------------------------------------------------------------------
    api_throttle_rate: float = Field(default=50.0, gt=0, le=10_000)
    api_throttle_burst: int = Field(default=100, ge=1, le=5_000)
    # API Gateway writes access logs only with an account-wide CloudWatch role. False when the
    # account already has one (the setting is per account and region, the last writer wins).
    api_cloudwatch_role: bool = True

    # --- operations --------------------------------------------------------------------------
    log_retention_days: int = 90
    alarm_email: str | None = None

    # --- build -------------------------------------------------------------------------------
    # Relative paths are relative to the repository root (``python -m infra.bundle`` writes it).
    lambda_asset_dir: str = "build/lambda"
    # Tests synthesise against a source-only bundle; a real synth refuses one.
    allow_stub_lambda_bundle: bool = False

    @field_validator("instance_classes", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return value

    @field_validator("instance_classes")
    @classmethod
    def _known_gpu_classes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one instance class is needed")
        unknown = [name for name in value if name not in GPU_INSTANCE_CLASSES]
        if unknown:
            raise ValueError(f"{unknown} not among the x86_64 NVIDIA GPU classes {sorted(GPU_INSTANCE_CLASSES)}")
        return value

    @field_validator("download_hosts", "sectra_callback_hosts")
    @classmethod
    def _host_list(cls, value: str) -> str:
        entries = [entry.strip() for entry in value.split(",") if entry.strip()]
        bad = [entry for entry in entries if not _HOST_ENTRY.match(entry)]
        if bad:
            raise ValueError(f"entries {bad} are not host, host:port or http://host[:port]")
        return ",".join(entries)

    @field_validator("outbound_trusted_networks")
    @classmethod
    def _cidr_list(cls, value: str) -> str:
        entries = [entry.strip() for entry in value.split(",") if entry.strip()]
        for entry in entries:
            ipaddress.ip_network(entry, strict=True)  # ValueError names the bad entry
        return ",".join(entries)

    @field_validator("techcyte_api_url")
    @classmethod
    def _https_url(cls, value: str) -> str:
        if not re.match(r"^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/\S*)?$", value):
            raise ValueError("must be an https:// URL")
        return value.rstrip("/")

    @field_validator("log_retention_days")
    @classmethod
    def _retention(cls, value: int) -> int:
        if value not in _LOG_RETENTION_DAYS:
            raise ValueError(f"CloudWatch Logs accepts only {sorted(_LOG_RETENTION_DAYS)}")
        return value

    @field_validator("alarm_email", "techcyte_credentials_secret_arn", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `-c alarm_email=` passes an empty string: treat it as "not set".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("alarm_email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL.match(value):
            raise ValueError("must be an e-mail address")
        return value

    # --- derived -----------------------------------------------------------------------------

    @property
    def gpu_instance_classes(self) -> list[ec2.InstanceClass]:
        return [GPU_INSTANCE_CLASSES[name] for name in self.instance_classes]

    @property
    def log_retention(self) -> logs.RetentionDays:
        return _LOG_RETENTION_DAYS[self.log_retention_days]

    def outbound_environment(self) -> dict[str, str]:
        """The outbound-URL policy variables (DESIGN §6) for every runtime component.

        Always set, even when empty: unset, slidebridge.settings would fall back to its local default
        (loopback hosts), which must never be reachable from a request in AWS.
        """
        return {
            "SLIDEBRIDGE_DOWNLOAD_HOSTS": self.download_hosts,
            "SLIDEBRIDGE_SECTRA_CALLBACK_HOSTS": self.sectra_callback_hosts,
            "SLIDEBRIDGE_OUTBOUND_TRUSTED_NETWORKS": self.outbound_trusted_networks,
            "SLIDEBRIDGE_TECHCYTE_API_URL": self.techcyte_api_url,
        }

    # --- loading -----------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> InfraConfig:
        """Validate ``values`` (context key → value); unknown keys are not looked at."""
        known = {name: values[name] for name in cls.model_fields if values.get(name) is not None}
        try:
            return cls.model_validate(known)
        except ValidationError as exc:
            raise InfraConfigError(_describe(exc)) from None

    @classmethod
    def from_context(cls, node: Node) -> InfraConfig:
        """Read every field from the CDK context of ``node`` (cdk.json "context" and ``-c``)."""
        return cls.from_mapping({name: node.try_get_context(name) for name in cls.model_fields})


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        key = str(error["loc"][0]) if error["loc"] else "?"
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"CDK context key '{key}': {message} (got {error.get('input')!r})")
    return "; ".join(lines)
