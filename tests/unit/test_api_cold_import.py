"""The ``api`` handler's cold start: its import loads no heavy module, a route loads only what it needs,
and in Lambda tracing still works (the X-Ray SDK loads there, at import, and the handler is traced).

Each case runs in a fresh interpreter: this process has long since imported everything.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# Loaded by a request that needs them (or, for the X-Ray SDK, only in Lambda), never by the import.
HEAVY = (
    "aws_xray_sdk",
    "boto3",
    "botocore.session",
    "botocore.client",
    "httpx",
    "jsonschema",
    "pydantic_settings",
    "slidebridge.settings",
    "slidebridge.store",
    "slidebridge.platform",
    "slidebridge.openapi",
    "slidebridge.vendors.sectra",
    "slidebridge.vendors.techcyte",
)


def _run(code: str, env: dict[str, str]) -> Any:
    """Run ``code`` in a fresh interpreter; what it printed after ``RESULT ``, as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])


def _outside_lambda() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAMBDA_", "AWS_LAMBDA_", "_X_AMZN"))}
    env.pop("POWERTOOLS_TRACE_DISABLED", None)
    return env


def _loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [name for name in names if any(m == name or m.startswith(name + ".") for m in modules)]


def test_importing_the_handler_loads_no_heavy_module() -> None:
    result = _run(
        "import json, sys\nimport lambdas.api.handler\nprint('RESULT ' + json.dumps(sorted(sys.modules)))",
        _outside_lambda(),
    )
    assert _loaded(result, HEAVY) == []


def test_a_techcyte_webhook_loads_neither_sectra_nor_platform_code() -> None:
    code = """
import json, sys
from moto import mock_aws
import boto3
with mock_aws(config={"batch": {"use_docker": False}}):
    from slidebridge.store import TABLE_DEFINITION
    boto3.client("dynamodb").create_table(TableName="cold-import", **TABLE_DEFINITION)
    batch = boto3.client("batch")
    role = boto3.client("iam").create_role(RoleName="batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    env = batch.create_compute_environment(
        computeEnvironmentName="cold", type="UNMANAGED", state="ENABLED", serviceRole=role
    )["computeEnvironmentArn"]
    batch.create_job_queue(
        jobQueueName="cold", state="ENABLED", priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": env}],
    )
    batch.register_job_definition(
        jobDefinitionName="cold", type="container", containerProperties={"image": "job", "vcpus": 1, "memory": 512}
    )
    from lambdas.api.handler import handler
    from tests.apigw import LambdaContext, api_event
    body = {"task_id": "4242", "scans": {"5550001": "https://bucket.s3.us-west-2.amazonaws.com/a.svs?X-Amz-Signature=x"}}
    response = handler(api_event("POST", "/hooks/techcyte/cold-key", body=body), LambdaContext())
    print("RESULT " + json.dumps({"status": response["statusCode"], "modules": sorted(sys.modules)}))
"""
    env = _outside_lambda() | {
        "AWS_DEFAULT_REGION": "eu-central-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "SLIDEBRIDGE_TABLE_NAME": "cold-import",
        "SLIDEBRIDGE_LAUNCHER": "batch",
        "SLIDEBRIDGE_JOB_QUEUE": "cold",
        "SLIDEBRIDGE_JOB_DEFINITION": "cold",
        "SLIDEBRIDGE_TECHCYTE_WEBHOOK_KEY": "cold-key",
        "SLIDEBRIDGE_DOWNLOAD_HOSTS": "bucket.s3.us-west-2.amazonaws.com",
    }
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "SLIDEBRIDGE_WEBHOOK_KEYS_SECRET_ARN"):
        env.pop(name, None)
    result = _run(code, env)
    assert result["status"] == 200
    assert _loaded(result["modules"], ("slidebridge.vendors.sectra", "slidebridge.platform", "aws_xray_sdk")) == []


@pytest.fixture
def xray_daemon() -> Any:
    """A UDP socket on 127.0.0.1 standing in for the X-Ray daemon (what the SDK sends segments to)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(20)
    yield sock
    sock.close()


def test_in_lambda_the_handler_is_traced(xray_daemon: socket.socket) -> None:
    port = xray_daemon.getsockname()[1]
    env = _outside_lambda() | {
        "LAMBDA_TASK_ROOT": str(REPO),
        "AWS_LAMBDA_FUNCTION_NAME": "slidebridge-api",
        "AWS_XRAY_DAEMON_ADDRESS": f"127.0.0.1:{port}",
        "_X_AMZN_TRACE_ID": "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
        "POWERTOOLS_SERVICE_NAME": "slidebridge-test",
    }
    code = """
import json, sys
import lambdas.api.handler as api
from lambdas.observability import tracer
from tests.apigw import LambdaContext, api_event
loaded = "aws_xray_sdk.core" in sys.modules
response = api.handler(api_event("GET", "/nowhere"), LambdaContext())
result = {"loaded_at_import": loaded, "disabled": tracer.disabled, "status": response["statusCode"]}
print("RESULT " + json.dumps(result))
"""
    result = _run(code, env)
    assert result == {"loaded_at_import": True, "disabled": False, "status": 404}
    # The handler's subsegment reached the daemon, with Powertools' annotations.
    header, document = xray_daemon.recvfrom(65536)[0].decode().split("\n", 1)
    assert json.loads(header) == {"format": "json", "version": 1}
    segment = json.loads(document)
    assert segment["name"] == "## handler"
    assert segment["trace_id"] == "1-5759e988-bd862e3fe1be46a994272793"
    assert segment["annotations"] == {"ColdStart": True, "Service": "slidebridge-test"}
