"""is_transient_aws_error: which AWS failures earn the job another attempt (botocore's own classes)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

from slidebridge.aws_errors import is_transient_aws_error


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_client_error("ProvisionedThroughputExceededException", 400), True),
        (_client_error("ThrottlingException", 400), True),
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("ServiceUnavailable", 503), True),
        (_client_error("RequestTimeout", 400), True),
        (EndpointConnectionError(endpoint_url="https://dynamodb.eu-west-1.amazonaws.com"), True),
        (ReadTimeoutError(endpoint_url="https://s3.amazonaws.com"), True),
        # The caller's fault or ours: another attempt gives the same answer.
        (_client_error("ConditionalCheckFailedException", 400), False),
        (_client_error("AccessDenied", 403), False),
        (_client_error("ValidationException", 400), False),
        (_client_error("NoSuchBucket", 404), False),
        (NoCredentialsError(), False),
        (ValueError("not an AWS error"), False),
    ],
)
def test_transient_aws_errors(error: Exception, transient: bool) -> None:
    assert is_transient_aws_error(error) is transient
