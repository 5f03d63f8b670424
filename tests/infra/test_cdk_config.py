"""Deployment configuration from CDK context: defaults, `-c` strings, and errors naming the key."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from infra.config import InfraConfig, InfraConfigError
from infra.stack import create_app
from tests.infra.support import EXISTING_VPC, make_ca_pem


def test_defaults_need_no_context() -> None:
    config = InfraConfig.from_mapping({})
    assert config.stage == "prod"
    assert config.instance_classes == ("g4dn", "g5", "g6")
    assert config.spot is True
    assert config.slides_retention_days == 7
    assert config.techcyte_api_url == "https://api.app.techcyte.com/api/v3"
    assert config.alarm_email is None


def test_command_line_strings_are_parsed() -> None:
    # `cdk synth -c key=value` delivers every value as a string.
    config = InfraConfig.from_mapping(
        {
            "instance_classes": "g5, g6e",
            "spot": "false",
            "max_vcpus": "128",
            "job_timeout_hours": "1.5",
            "alarm_email": "",
            "techcyte_api_url": "https://api.ci.techcyte.com/api/v3/",
        }
    )
    assert config.instance_classes == ("g5", "g6e")
    assert config.spot is False
    assert config.max_vcpus == 128
    assert config.job_timeout_hours == 1.5
    assert config.alarm_email is None
    assert config.techcyte_api_url == "https://api.ci.techcyte.com/api/v3"


def test_trusted_networks_are_cidrs() -> None:
    config = InfraConfig.from_mapping({"outbound_trusted_networks": "10.20.0.0/16, fd00::/8"})
    assert config.outbound_environment()["SLIDEBRIDGE_OUTBOUND_TRUSTED_NETWORKS"] == "10.20.0.0/16,fd00::/8"


def test_json_list_from_cdk_json_or_command_line() -> None:
    assert InfraConfig.from_mapping({"instance_classes": ["g6"]}).instance_classes == ("g6",)
    assert InfraConfig.from_mapping({"instance_classes": '["p4d", "p5"]'}).instance_classes == ("p4d", "p5")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_vcpus", "lots"),
        ("max_vcpus", 2),  # below one job's 4 vCPUs
        ("spot", "perhaps"),
        ("instance_classes", "g5g"),  # Graviton: cannot run the x86_64 NVIDIA AMI
        ("instance_classes", "m5"),
        ("instance_classes", ""),
        ("stage", "Prod_1"),
        ("techcyte_api_url", "http://api.app.techcyte.com/api/v3"),
        ("download_hosts", "https://slides.example.org"),
        ("sectra_callback_hosts", "pacs.example.org/path"),
        ("log_retention_days", 10),
        ("alarm_email", "not-an-address"),
        ("job_subnets", "isolated"),
        ("outbound_trusted_networks", "10.0.0.0/8, 10.1.2.3/16"),  # host bits set
        ("techcyte_credentials_secret_arn", "arn:aws:s3:::bucket"),
        ("on_demand_max_vcpus", 2),  # neither 0 (no fallback) nor room for one job
        ("vpc_id", "my-vpc"),
        ("vpc_subnet_ids", "subnet-0aaaaaaaaaaaaaaa1"),  # without vpc_id
        ("nat_gateways", 3),  # more than max_azs=2
        ("waf_allowed_cidrs", "203.0.113.7/24"),  # host bits set
        ("waf_rate_limit", 10),
        ("webhook_body_limit_kb", "100"),  # WAF cannot inspect that much
        ("public_url", "http://slides.example.org"),
        ("sectra_context", "[1, 2]"),
        ("sectra_context", "{autoRun: true}"),
        ("ca_bundle_file", "no/such/ca.pem"),
        ("queue_age_alarm_minutes", 1),
    ],
)
def test_bad_value_names_the_key(key: str, value: Any) -> None:
    with pytest.raises(InfraConfigError, match=f"CDK context key '{key}'"):
        InfraConfig.from_mapping({key: value})


def test_unrelated_context_keys_are_ignored() -> None:
    config = InfraConfig.from_mapping({"@aws-cdk/core:target-partitions": ["aws"], "stage": "dev"})
    assert config.stage == "dev"


def test_bad_context_stops_the_app_before_any_stack_is_built(
    make_context: Callable[..., dict[str, Any]],
) -> None:
    with pytest.raises(InfraConfigError, match="'max_vcpus'"):
        create_app(make_context(max_vcpus="many"))


def test_cdk_json_context_is_valid() -> None:
    cdk_json = json.loads((Path(__file__).resolve().parents[2] / "cdk.json").read_text())
    config = InfraConfig.from_mapping(cdk_json["context"])
    assert config.stage == "prod"


@pytest.mark.parametrize(
    ("context", "key"),
    [
        ({"vpc_id": "vpc-0a1b2c3d4e5f60718"}, "vpc_subnet_ids"),
        ({**EXISTING_VPC, "vpc_availability_zones": "eu-west-1a"}, "vpc_availability_zones"),
        ({**EXISTING_VPC, "vpc_route_table_ids": "rtb-0ccccccccccccccc1"}, "vpc_route_table_ids"),
        # Gateway endpoints need the route tables, unless the VPC has its endpoints already.
        ({**EXISTING_VPC, "vpc_route_table_ids": ""}, "vpc_route_table_ids"),
        ({**EXISTING_VPC, "job_subnets": "public"}, "job_subnets"),
        ({**EXISTING_VPC, "vpc_subnet_ids": "subnet-0aaaaaaaaaaaaaaa1,sn-2"}, "vpc_subnet_ids"),
    ],
)
def test_existing_vpc_settings_must_fit_together(context: dict[str, Any], key: str) -> None:
    with pytest.raises(InfraConfigError, match=f"CDK context key '{key}'"):
        InfraConfig.from_mapping(context)


def test_existing_vpc_without_endpoints_needs_no_route_tables() -> None:
    config = InfraConfig.from_mapping({**EXISTING_VPC, "vpc_route_table_ids": "", "vpc_endpoints": "false"})
    assert config.vpc_subnet_ids == ("subnet-0aaaaaaaaaaaaaaa1", "subnet-0bbbbbbbbbbbbbbb2")
    assert config.vpc_endpoints is False


def test_sectra_context_from_cdk_json_object_or_command_line_text() -> None:
    assert InfraConfig.from_mapping({"sectra_context": {"autoRun": True}}).sectra_context == '{"autoRun":true}'
    assert InfraConfig.from_mapping({"sectra_context": '{"output": "patches"}'}).sectra_context == (
        '{"output":"patches"}'
    )
    assert InfraConfig.from_mapping({"sectra_context": ""}).sectra_context is None


def test_network_defaults_are_private_with_endpoints() -> None:
    config = InfraConfig.from_mapping({})
    assert config.vpc_id is None
    assert config.job_subnets == "private"
    assert config.vpc_endpoints is True
    assert config.on_demand_max_vcpus == 16
    assert config.waf_allowed_cidrs == ""


def test_ca_bundle_must_hold_certificates_only(tmp_path: Path) -> None:
    good = tmp_path / "ca.pem"
    good.write_text(make_ca_pem())
    assert InfraConfig.from_mapping({"ca_bundle_file": str(good)}).ca_bundle_pem == good.read_text()

    with_key = tmp_path / "with-key.pem"
    with_key.write_text(good.read_text() + "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    too_big = tmp_path / "big.pem"
    too_big.write_text(good.read_text() * 40)
    for path, reason in ((with_key, "private key"), (garbage, "not a readable PEM"), (too_big, "user data")):
        with pytest.raises(InfraConfigError, match=f"CDK context key 'ca_bundle_file': .*{reason}"):
            InfraConfig.from_mapping({"ca_bundle_file": str(path)})
