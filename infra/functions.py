"""The one way this stack makes a Python Lambda function (both share the code asset from infra.bundle)."""

from __future__ import annotations

from collections.abc import Mapping

import aws_cdk as cdk
import aws_cdk.aws_lambda as lambda_
import aws_cdk.aws_logs as logs
import aws_cdk.aws_sqs as sqs
from constructs import Construct

from infra.config import InfraConfig
from infra.nag import acknowledge

# The bundle's wheels are built for exactly this runtime and architecture (infra.bundle.PIP_PLATFORM_ARGS).
RUNTIME = lambda_.Runtime.PYTHON_3_12
ARCHITECTURE = lambda_.Architecture.X86_64
POWERTOOLS_SERVICE_NAME = "slidebridge"
METRICS_NAMESPACE = "Slidebridge"


def python_function(
    scope: Construct,
    construct_id: str,
    *,
    config: InfraConfig,
    code: lambda_.Code,
    handler: str,
    description: str,
    environment: Mapping[str, str],
    timeout: cdk.Duration,
    memory_size: int,
    dead_letter_queue: sqs.IQueue | None = None,
) -> lambda_.Function:
    log_group = logs.LogGroup(
        scope,
        f"{construct_id}Logs",
        retention=config.log_retention,
        removal_policy=cdk.RemovalPolicy.DESTROY,
    )
    function = lambda_.Function(
        scope,
        construct_id,
        runtime=RUNTIME,
        architecture=ARCHITECTURE,
        code=code,
        handler=handler,
        description=description,
        memory_size=memory_size,
        timeout=timeout,
        tracing=lambda_.Tracing.ACTIVE,
        log_group=log_group,
        dead_letter_queue=dead_letter_queue,
        environment={
            "POWERTOOLS_SERVICE_NAME": POWERTOOLS_SERVICE_NAME,
            "POWERTOOLS_METRICS_NAMESPACE": METRICS_NAMESPACE,
            **environment,
        },
    )
    acknowledge(
        function,
        "AwsSolutions-L1",
        "Python 3.12 on purpose: the bundle's wheels are built for it and the code is tested on it (DESIGN §2).",
    )
    acknowledge(
        function,
        "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole]",
        "The AWS-maintained basic execution policy grants CloudWatch Logs writes only.",
    )
    acknowledge(
        function,
        "AwsSolutions-IAM5[Resource::*]",
        "Active tracing: X-Ray's PutTraceSegments and PutTelemetryRecords have no resource-level permissions.",
    )
    return function
