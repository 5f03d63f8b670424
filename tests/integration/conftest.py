"""Integration fixtures: AWS through moto, in process (no network at all)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import boto3
import pytest
from moto import mock_aws

from lambdas.api import deps
from local.moto_atomic import serialize_dynamodb_requests
from slidebridge.settings import get_settings
from slidebridge.store import TABLE_DEFINITION, RunStore

TABLE = "slidebridge-test"
BUCKET = "slidebridge-test-data"
TOKEN = "test-token-0123456789"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("SLIDEBRIDGE_TABLE_NAME", TABLE)
    monkeypatch.setenv("SLIDEBRIDGE_BUCKET_NAME", BUCKET)
    get_settings.cache_clear()
    serialize_dynamodb_requests()
    with mock_aws(config={"batch": {"use_docker": False}}):
        boto3.client("dynamodb").create_table(TableName=TABLE, **TABLE_DEFINITION)
        boto3.client("s3").create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-central-1"}
        )
        yield
    get_settings.cache_clear()


@pytest.fixture
def store(aws: None) -> RunStore:
    return RunStore(TABLE)


def batch_resources() -> tuple[str, str]:
    """A Batch compute environment, queue and job definition in moto, as the stack creates them."""
    ec2 = boto3.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24")["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName="batch", Description="batch", VpcId=vpc)["GroupId"]
    role = boto3.client("iam").create_role(
        RoleName="batch", AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": []})
    )["Role"]["Arn"]
    iam = boto3.client("iam")
    profile = iam.create_instance_profile(InstanceProfileName="batch")["InstanceProfile"]["Arn"]
    iam.add_role_to_instance_profile(InstanceProfileName="batch", RoleName="batch")
    batch = boto3.client("batch")
    env = batch.create_compute_environment(
        computeEnvironmentName="gpu",
        type="MANAGED",
        state="ENABLED",
        computeResources={
            "type": "EC2",
            "minvCpus": 0,
            "maxvCpus": 16,
            "instanceTypes": ["g4dn.xlarge"],
            "subnets": [subnet],
            "securityGroupIds": [sg],
            "instanceRole": profile,
        },
        serviceRole=role,
    )["computeEnvironmentArn"]
    queue = batch.create_job_queue(
        jobQueueName="gpu",
        state="ENABLED",
        priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": env}],
    )["jobQueueArn"]
    definition = batch.register_job_definition(
        jobDefinitionName="slidebridge-job",
        type="container",
        parameters={"run_id": "none"},
        containerProperties={
            "image": "slidebridge-job:latest",
            "command": ["python", "-m", "batch_job", "Ref::run_id"],
            "resourceRequirements": [{"type": "VCPU", "value": "4"}, {"type": "MEMORY", "value": "15360"}],
        },
    )["jobDefinitionArn"]
    return queue, definition


@pytest.fixture
def batch_api(aws: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The ``api`` handler's settings for submitting to that Batch queue; its cached collaborators are
    rebuilt around the test (a test may set more variables before its first request)."""
    queue, definition = batch_resources()
    monkeypatch.setenv("SLIDEBRIDGE_LAUNCHER", "batch")
    monkeypatch.setenv("SLIDEBRIDGE_JOB_QUEUE", queue)
    monkeypatch.setenv("SLIDEBRIDGE_JOB_DEFINITION", definition)
    deps.reset()
    yield
    deps.reset()
