"""Deployment configuration, read from CDK context (``cdk.json`` "context" and ``cdk synth -c key=value``).

Every key has a default, so a bare ``cdk synth`` works. ``-c`` values arrive as strings, so list fields
also accept ``"g4dn,g5"`` and numbers/booleans are parsed leniently. A bad value stops synth with an
``InfraConfigError`` that names the context key.
"""

from __future__ import annotations

import ipaddress
import json
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import aws_cdk.aws_ec2 as ec2
import aws_cdk.aws_logs as logs
from constructs import Node
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from infra.bundle import REPO_ROOT

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
_VPC_ID = re.compile(r"^vpc-[0-9a-f]{8,17}$")
_SUBNET_ID = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_ROUTE_TABLE_ID = re.compile(r"^rtb-[0-9a-f]{8,17}$")
_AVAILABILITY_ZONE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d[a-z]$")
# One job asks for this many vCPUs (infra.batch.JOB_VCPUS): a compute environment needs at least that.
MIN_VCPUS = 4
# AWS WAF inspects at most this much of a request body for API Gateway (KB_16 .. KB_64 in AssociationConfig).
WAF_BODY_LIMITS_KB = (16, 32, 48, 64)
# The CA bundle travels to the job instances in the launch template's user data, which EC2 caps at 16 KB.
MAX_CA_BUNDLE_BYTES = 12 * 1024


class InfraConfigError(ValueError):
    """A CDK context value is invalid; the message names the context key."""


def _key_error(key: str, message: str) -> ValueError:
    """An error about one key, raised where pydantic cannot tell which (model validators)."""
    return ValueError(f"CDK context key '{key}': {message}")


def _split(value: Any) -> Any:
    """``-c key=a,b`` and ``-c 'key=["a","b"]'`` both give a list; cdk.json gives one already."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return value


class InfraConfig(BaseModel):
    """Everything a deployment may choose. Field names are the CDK context keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Part of every physical name and the API stage name, so two stages can share an account.
    stage: str = Field(default="prod", pattern=r"^[a-z][a-z0-9-]{0,19}$")

    # --- batch -------------------------------------------------------------------------------
    instance_classes: tuple[str, ...] = ("g4dn", "g5", "g6")
    # The spot compute environment's ceiling (or the on-demand one's, with spot=false).
    max_vcpus: int = Field(default=64, ge=MIN_VCPUS, le=10_000)
    spot: bool = True
    # With spot: an on-demand compute environment behind the spot one in the same queue, up to this many
    # vCPUs; 0 = spot only. Batch places a job there when the spot environment cannot take it.
    on_demand_max_vcpus: int = Field(default=16, ge=0, le=10_000)
    root_volume_gib: int = Field(default=200, ge=30, le=16_384)
    job_timeout_hours: float = Field(default=4.0, gt=0, le=336)
    # A job left RUNNABLE this long because no GPU capacity can be had is cancelled (job_events then
    # ends its items SYSTEM_ERROR) instead of waiting forever.
    capacity_wait_hours: float = Field(default=6.0, ge=0.25, le=24)

    # --- network -----------------------------------------------------------------------------
    # Unset: a new VPC (public subnets for the NAT gateways, private subnets with egress for everything
    # else). Set: that existing VPC; its private subnets (with egress: NAT, or a transit gateway to the
    # hospital network) are named by id, with their availability zones and route tables in the same order.
    vpc_id: str | None = Field(default=None, pattern=_VPC_ID.pattern)
    vpc_subnet_ids: tuple[str, ...] = ()
    vpc_availability_zones: tuple[str, ...] = ()
    vpc_route_table_ids: tuple[str, ...] = ()
    # Gateway endpoints (S3, DynamoDB) and interface endpoints (ECR, CloudWatch Logs, Secrets Manager).
    # Set false for an existing VPC that has them already (a second private-DNS endpoint fails).
    vpc_endpoints: bool = True
    max_azs: int = Field(default=2, ge=1, le=3)
    nat_gateways: int = Field(default=1, ge=1, le=3)
    # "private": job instances in the private subnets. "public" (new VPC only): public subnets with public
    # IPs and a security group closed to inbound traffic, so multi-GB slide downloads from outside AWS pay
    # no NAT data charge. The Lambda functions stay in the private subnets either way.
    job_subnets: Literal["public", "private"] = "private"
    # A PEM file (path relative to the repository root) with the CA certificates of hospital-internal
    # Sectra servers. Added to the public roots for every outbound call of the functions and the job.
    ca_bundle_file: str | None = None

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
    # WAF on the stage: requests per 5 minutes per source IP, and optionally only these source CIDRs.
    waf_rate_limit: int = Field(default=1000, ge=100, le=2_000_000_000)
    waf_allowed_cidrs: str = ""
    # Vendor webhook bodies above this size are refused by WAF (Platform API bodies keep API Gateway's 10 MB).
    webhook_body_limit_kb: int = 64
    # What the Sectra registration shows (slidebridge.settings; unset = the runtime default).
    public_url: str | None = None
    sectra_application_id: str | None = Field(default=None, min_length=1, max_length=128)
    sectra_display_name: str | None = Field(default=None, min_length=1, max_length=128)
    sectra_context: str | None = None

    # --- operations --------------------------------------------------------------------------
    log_retention_days: int = 90
    alarm_email: str | None = None
    # The "oldest queued job" alarm fires when a job has waited this long for an instance.
    queue_age_alarm_minutes: int = Field(default=60, ge=5, le=24 * 60)

    # --- build -------------------------------------------------------------------------------
    # Relative paths are relative to the repository root (``python -m infra.bundle`` writes it).
    lambda_asset_dir: str = "build/lambda"
    # Tests synthesise against a source-only bundle; a real synth refuses one.
    allow_stub_lambda_bundle: bool = False

    @field_validator(
        "instance_classes", "vpc_subnet_ids", "vpc_availability_zones", "vpc_route_table_ids", mode="before"
    )
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("vpc_subnet_ids", "vpc_availability_zones", "vpc_route_table_ids")
    @classmethod
    def _aws_ids(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        pattern = {
            "vpc_subnet_ids": _SUBNET_ID,
            "vpc_availability_zones": _AVAILABILITY_ZONE,
            "vpc_route_table_ids": _ROUTE_TABLE_ID,
        }[str(info.field_name)]
        bad = [entry for entry in value if not pattern.match(entry)]
        if bad:
            raise ValueError(f"entries {bad} do not look like {pattern.pattern}")
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

    @field_validator("outbound_trusted_networks", "waf_allowed_cidrs")
    @classmethod
    def _cidr_list(cls, value: str) -> str:
        entries = [entry.strip() for entry in value.split(",") if entry.strip()]
        for entry in entries:
            ipaddress.ip_network(entry, strict=True)  # ValueError names the bad entry
        return ",".join(entries)

    @field_validator("techcyte_api_url", "public_url")
    @classmethod
    def _https_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/\S*)?$", value):
            raise ValueError("must be an https:// URL")
        return value.rstrip("/")

    @field_validator("webhook_body_limit_kb")
    @classmethod
    def _waf_body_limit(cls, value: int) -> int:
        if value not in WAF_BODY_LIMITS_KB:
            raise ValueError(f"AWS WAF inspects API Gateway bodies only up to {list(WAF_BODY_LIMITS_KB)} KB")
        return value

    @field_validator("sectra_context", mode="before")
    @classmethod
    def _json_object_text(cls, value: Any) -> Any:
        # cdk.json may hold the object itself; the runtime setting is JSON text.
        if isinstance(value, dict):
            return json.dumps(value, separators=(",", ":"))
        if isinstance(value, str) and value.strip():
            try:
                loaded = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc.msg}") from None
            if not isinstance(loaded, dict):
                raise ValueError('must be a JSON object, e.g. {"autoRun": true}')
            return json.dumps(loaded, separators=(",", ":"))
        return value

    @field_validator("ca_bundle_file")
    @classmethod
    def _ca_bundle(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = resolve_path(value)
        if not path.is_file():
            raise ValueError(f"no file at {path}")
        text = path.read_text(encoding="ascii", errors="replace")
        if "PRIVATE KEY" in text:
            raise ValueError("holds a private key; only CA certificates belong there")
        if len(text.encode()) > MAX_CA_BUNDLE_BYTES:
            raise ValueError(f"over {MAX_CA_BUNDLE_BYTES} bytes: it travels in EC2 user data (16 KB in all)")
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ValueError("no PEM certificate in it")
        try:
            ssl.create_default_context(cadata=text)
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"not a readable PEM CA bundle ({exc})") from None
        return value

    @field_validator("log_retention_days")
    @classmethod
    def _retention(cls, value: int) -> int:
        if value not in _LOG_RETENTION_DAYS:
            raise ValueError(f"CloudWatch Logs accepts only {sorted(_LOG_RETENTION_DAYS)}")
        return value

    @field_validator(
        "alarm_email",
        "techcyte_credentials_secret_arn",
        "vpc_id",
        "ca_bundle_file",
        "public_url",
        "sectra_application_id",
        "sectra_display_name",
        "sectra_context",
        mode="before",
    )
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

    @model_validator(mode="after")
    def _consistent(self) -> InfraConfig:
        if self.spot and 0 < self.on_demand_max_vcpus < MIN_VCPUS:
            raise _key_error("on_demand_max_vcpus", f"0 (no fallback) or at least {MIN_VCPUS} (one job)")
        if self.vpc_id is None:
            for key in ("vpc_subnet_ids", "vpc_availability_zones", "vpc_route_table_ids"):
                if getattr(self, key):
                    raise _key_error(key, "only with vpc_id (a new VPC brings its own subnets)")
            if self.nat_gateways > self.max_azs:
                raise _key_error("nat_gateways", f"at most one per availability zone (max_azs={self.max_azs})")
            return self
        if not self.vpc_subnet_ids:
            raise _key_error("vpc_subnet_ids", "the private subnets (with egress) of the VPC in vpc_id are needed")
        if len(self.vpc_availability_zones) != len(self.vpc_subnet_ids):
            raise _key_error("vpc_availability_zones", "one per subnet of vpc_subnet_ids, in the same order")
        if self.vpc_route_table_ids and len(self.vpc_route_table_ids) != len(self.vpc_subnet_ids):
            raise _key_error("vpc_route_table_ids", "one per subnet of vpc_subnet_ids, in the same order")
        if self.vpc_endpoints and not self.vpc_route_table_ids:
            raise _key_error(
                "vpc_route_table_ids", "needed for the S3 and DynamoDB gateway endpoints (or set vpc_endpoints=false)"
            )
        if self.job_subnets != "private":
            raise _key_error("job_subnets", "an existing VPC is used through its private subnets only")
        return self

    # --- derived -----------------------------------------------------------------------------

    @property
    def gpu_instance_classes(self) -> list[ec2.InstanceClass]:
        return [GPU_INSTANCE_CLASSES[name] for name in self.instance_classes]

    @property
    def log_retention(self) -> logs.RetentionDays:
        return _LOG_RETENTION_DAYS[self.log_retention_days]

    @property
    def ca_bundle_pem(self) -> str | None:
        """The hospital CA certificates (PEM text), if configured."""
        if self.ca_bundle_file is None:
            return None
        return resolve_path(self.ca_bundle_file).read_text(encoding="ascii").strip() + "\n"

    @property
    def waf_allowed_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(entry) for entry in self.waf_allowed_cidrs.split(",") if entry]

    def sectra_registration_environment(self) -> dict[str, str]:
        """The configured Sectra registration settings for the api function (unset ones keep their default)."""
        values = {
            "SLIDEBRIDGE_PUBLIC_URL": self.public_url,
            "SLIDEBRIDGE_SECTRA_APPLICATION_ID": self.sectra_application_id,
            "SLIDEBRIDGE_SECTRA_DISPLAY_NAME": self.sectra_display_name,
            "SLIDEBRIDGE_SECTRA_CONTEXT": self.sectra_context,
        }
        return {name: value for name, value in values.items() if value is not None}

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


def resolve_path(value: str) -> Path:
    """A path from the context: absolute, or relative to the repository root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        if not error["loc"]:
            lines.append(message)  # a model validator's message names its key already
            continue
        key = str(error["loc"][0])
        lines.append(f"CDK context key '{key}': {message} (got {error.get('input')!r})")
    return "; ".join(lines)
