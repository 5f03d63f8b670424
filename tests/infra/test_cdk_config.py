"""Deployment configuration from CDK context: defaults, `-c` strings, and errors naming the key."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from infra.config import InfraConfig, InfraConfigError
from infra.stack import create_app


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
