"""The one way this stack makes a Python Lambda function (all share the code asset from infra.bundle)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import aws_cdk as cdk
import aws_cdk.aws_lambda as lambda_
import aws_cdk.aws_sqs as sqs
from constructs import Construct

from infra.config import InfraConfig
from infra.nag import acknowledge
from infra.network import Network
from infra.storage import Storage

# The bundle's wheels are built for exactly this runtime and architecture (infra.bundle.PIP_PLATFORM_ARGS).
RUNTIME = lambda_.Runtime.PYTHON_3_12
ARCHITECTURE = lambda_.Architecture.X86_64
# Must equal lambdas.observability.METRICS_NAMESPACE (a test compares them; infra imports no Lambda code).
METRICS_NAMESPACE = "Slidebridge"


def powertools_service(config: InfraConfig) -> str:
    """POWERTOOLS_SERVICE_NAME: the ``service`` dimension of every metric, one per stage."""
    return f"slidebridge-{config.stage}"


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
    storage: Storage,
    network: Network | None = None,
    layers: Sequence[lambda_.ILayerVersion] = (),
    dead_letter_queue: sqs.IQueue | None = None,
) -> lambda_.Function:
    """A function with active tracing, an encrypted log group and, given ``network``, a place in the VPC."""
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
        log_group=storage.log_group(scope, f"{construct_id}Logs", config),
        dead_letter_queue=dead_letter_queue,
        layers=list(layers) or None,
        vpc=network.vpc if network else None,
        vpc_subnets=network.private_subnets if network else None,
        security_groups=[network.function_security_group] if network else None,
        environment={
            "POWERTOOLS_SERVICE_NAME": powertools_service(config),
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
    if network:
        acknowledge(
            function,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AWSLambdaVPCAccessExecutionRole]",
            "The AWS-maintained VPC access policy manages the function's network interfaces in the VPC.",
        )
    acknowledge(
        function,
        "AwsSolutions-IAM5[Resource::*]",
        "Active tracing: X-Ray's PutTraceSegments and PutTelemetryRecords have no resource-level permissions.",
    )
    return function
