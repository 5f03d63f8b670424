"""Integration fixtures: AWS through moto, in process (no network at all)."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
from moto import mock_aws

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
