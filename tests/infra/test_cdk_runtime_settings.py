"""Every setting the runtime code needs reaches each function and the job, spelled as slidebridge.settings reads it.

What each component requires (a missing one would fall back to a local default and fail, or silently do
the wrong thing, only once deployed):

- api: the table, the bucket and its two prefixes (artifacts: presigned URLs; feedback: Sectra
  corrections), the Batch launcher with our queue and job definition, both secrets (webhook keys,
  Techcyte credentials for cancelled-run delivery), the outbound policy (download and Sectra callback
  hosts, trusted networks, the Techcyte API URL).
- job_events: the table, the bucket and artifacts prefix (stored Techcyte results), the Techcyte
  credentials secret, the outbound policy (it writes to Sectra and posts to Techcyte).
- job_metrics: the job queue whose backlog it measures.
- scheduler (deadline sweep): what job_events needs, plus the Batch launcher with our queue and job
  definition (it stops the jobs of the runs it cancels).
- job: the table, the bucket and artifacts prefix, the scratch directory on the large volume, the attempt
  limit the retry strategy uses, the outbound policy, and the Techcyte client id and secret (as Batch
  secrets, never plain environment).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from slidebridge.settings import Settings

if TYPE_CHECKING:
    from conftest import Synthesized

OUTBOUND = {"download_hosts", "sectra_callback_hosts", "outbound_trusted_networks", "techcyte_api_url"}
DATA = {"table_name", "bucket_name", "artifacts_prefix"}
REQUIRED: dict[str, set[str]] = {
    "api": DATA
    | OUTBOUND
    | {
        "feedback_prefix",
        "launcher",
        "job_queue",
        "job_definition",
        "webhook_keys_secret_arn",
        "techcyte_credentials_secret_arn",
    },
    "job_events": DATA | OUTBOUND | {"techcyte_credentials_secret_arn"},
    "job_metrics": {"job_queue"},
    "scheduler": DATA | OUTBOUND | {"launcher", "job_queue", "job_definition", "techcyte_credentials_secret_arn"},
    "job": DATA | OUTBOUND | {"scratch_dir", "batch_max_attempts", "techcyte_client_id", "techcyte_client_secret"},
}
# Set by the job definition as Batch secrets (the ECS agent reads Secrets Manager), never as plain values.
JOB_SECRETS = {"techcyte_client_id", "techcyte_client_secret"}
# Differ on purpose between the functions (a Lambda layer) and the job (a host volume).
PER_COMPONENT = {"SLIDEBRIDGE_CA_BUNDLE"}


def variable(setting: str) -> str:
    return f"SLIDEBRIDGE_{setting.upper()}"


def environments(synth: Synthesized) -> dict[str, dict[str, Any]]:
    """Component → its variables (the job's Batch secrets included, as their ValueFrom)."""
    stack = synth.stack

    def function_env(function: Any) -> dict[str, Any]:
        variables: dict[str, Any] = synth.resources[synth.logical_id(function)]["Properties"]["Environment"][
            "Variables"
        ]
        return variables

    (definition,) = synth.of_type("AWS::Batch::JobDefinition").values()
    container = definition["Properties"]["ContainerProperties"]
    job = {item["Name"]: item["Value"] for item in container["Environment"]}
    job.update({item["Name"]: {"secret": item["ValueFrom"]} for item in container.get("Secrets", [])})
    return {
        "api": function_env(stack.api.function),
        "job_events": function_env(stack.job_events.function),
        "job_metrics": function_env(stack.monitoring.job_metrics_function),
        "scheduler": function_env(stack.deadline_sweep.function),
        "job": job,
    }


def test_required_names_are_settings() -> None:
    for component, names in REQUIRED.items():
        assert names <= set(Settings.model_fields), component


@pytest.mark.parametrize("component", sorted(REQUIRED))
def test_component_has_every_setting_it_requires(synth: Synthesized, component: str) -> None:
    present = set(environments(synth)[component])
    missing = {variable(name) for name in REQUIRED[component]} - present
    assert missing == set()


def test_job_gets_techcyte_credentials_as_secrets_only(synth: Synthesized) -> None:
    job = environments(synth)["job"]
    for name in JOB_SECRETS:
        assert set(job[variable(name)]) == {"secret"}, name


def test_every_variable_the_stack_sets_is_a_setting(synth: Synthesized) -> None:
    known = {variable(name) for name in Settings.model_fields}
    for component, env in environments(synth).items():
        ours = {name for name in env if name.startswith("SLIDEBRIDGE_")}
        assert ours - known == set(), component


def test_shared_settings_agree_between_components(synth: Synthesized) -> None:
    values: dict[str, dict[str, str]] = {}
    for component, env in environments(synth).items():
        for name, value in env.items():
            if name.startswith("SLIDEBRIDGE_") and name not in PER_COMPONENT:
                values.setdefault(name, {})[component] = json.dumps(value, sort_keys=True)
    disagreeing = {name: by_component for name, by_component in values.items() if len(set(by_component.values())) > 1}
    assert disagreeing == {}


def _placeholder(name: str, value: Any) -> str:
    """A deploy-time value (a CloudFormation reference) as the kind of text it becomes."""
    if isinstance(value, str):
        return value
    if "SECRET_ARN" in name:
        return "arn:aws:secretsmanager:eu-west-1:123456789012:secret:slidebridge-AbCdEf"
    if name in ("SLIDEBRIDGE_JOB_QUEUE", "SLIDEBRIDGE_JOB_DEFINITION"):
        return f"arn:aws:batch:eu-west-1:123456789012:{name.rsplit('_', 2)[-2].lower()}/slidebridge:1"
    if name == "SLIDEBRIDGE_TECHCYTE_CLIENT_SECRET":
        return "client-secret"
    return "deploy-time-value"


@pytest.mark.parametrize("component", sorted(REQUIRED))
def test_environment_is_valid_settings(synth: Synthesized, component: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = environments(synth)[component]
    for name in list(Settings.model_fields):
        monkeypatch.delenv(variable(name), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, _placeholder(name, value))
    settings = Settings()
    # The local defaults (loopback allowlists, the process launcher) must never apply in AWS.
    if "download_hosts" in REQUIRED[component]:
        assert settings.download_hosts == "slides.example.org,*.s3.eu-west-1.amazonaws.com"
        assert settings.sectra_callback_hosts == "pacs.example.org:8443"
        assert settings.techcyte_api_url == "https://api.ci.techcyte.com/api/v3"
    if component in ("api", "scheduler"):
        assert settings.launcher == "batch"
    if component == "job":
        assert settings.scratch_dir == Path("/scratch")
        assert settings.batch_max_attempts == 3


def test_hospital_ca_bundle_reaches_every_component_that_calls_out(variant: Synthesized) -> None:
    env = environments(variant)
    assert env["api"]["SLIDEBRIDGE_CA_BUNDLE"] == "/opt/ca/ca-bundle.pem"
    assert env["job_events"]["SLIDEBRIDGE_CA_BUNDLE"] == "/opt/ca/ca-bundle.pem"
    assert env["scheduler"]["SLIDEBRIDGE_CA_BUNDLE"] == "/opt/ca/ca-bundle.pem"
    assert env["job"]["SLIDEBRIDGE_CA_BUNDLE"] == "/etc/slidebridge/ca-bundle.pem"
    # job_metrics calls only AWS.
    assert "SLIDEBRIDGE_CA_BUNDLE" not in env["job_metrics"]


def test_every_function_handler_exists(synth: Synthesized) -> None:
    code = synth.resources[synth.logical_id(synth.stack.api.function)]["Properties"]["Code"]
    ours = [f["Properties"] for f in synth.of_type("AWS::Lambda::Function").values() if f["Properties"]["Code"] == code]
    assert len(ours) == 4  # api, job_events, job_metrics, scheduler
    for props in ours:
        module_name, _, attribute = props["Handler"].rpartition(".")
        assert callable(getattr(importlib.import_module(module_name), attribute)), props["Handler"]
