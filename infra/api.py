"""API: the REST API (API Gateway v1) proxying every route to the ``api`` Lambda function.

The function's Powertools resolver does the routing (``/hooks/sectra/{key}``, ``/hooks/techcyte/{key}``,
``/api/v1/...``), so the gateway is a plain greedy proxy. Authentication is in the function too: the
vendor routes carry a secret path key, the Platform API a bearer token (DESIGN §6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import aws_cdk as cdk
import aws_cdk.aws_apigateway as apigateway
import aws_cdk.aws_lambda as lambda_
from constructs import Construct

from infra.batch import Jobs
from infra.config import InfraConfig
from infra.functions import python_function
from infra.nag import acknowledge
from infra.network import Network
from infra.storage import ARTIFACTS_PREFIX, FEEDBACK_PREFIX, Storage
from infra.waf import Waf

API_HANDLER = "lambdas.api.handler.handler"
# API Gateway's own integration limit is 29 s; a longer function timeout would only hide that.
API_TIMEOUT = cdk.Duration.seconds(29)
API_MEMORY_MB = 1024


class Api(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: InfraConfig,
        code: lambda_.Code,
        storage: Storage,
        jobs: Jobs,
        network: Network,
        layers: Sequence[lambda_.ILayerVersion] = (),
        extra_environment: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(scope, construct_id)

        self.function = python_function(
            self,
            "Function",
            config=config,
            code=code,
            handler=API_HANDLER,
            description="slidebridge API: vendor webhooks and the Platform API",
            timeout=API_TIMEOUT,
            memory_size=API_MEMORY_MB,
            storage=storage,
            # Sectra servers inside the hospital network may be reachable only through the VPC.
            network=network,
            layers=layers,
            environment={
                **storage.data_environment(),
                "SLIDEBRIDGE_FEEDBACK_PREFIX": FEEDBACK_PREFIX,
                # The bucket's artifact lifecycle, so the Platform API reports expired artifacts as deleted.
                "SLIDEBRIDGE_ARTIFACTS_RETENTION_DAYS": str(config.artifacts_retention_days),
                "SLIDEBRIDGE_WEBHOOK_KEYS_SECRET_ARN": storage.webhook_keys_secret.secret_arn,
                "SLIDEBRIDGE_TECHCYTE_CREDENTIALS_SECRET_ARN": storage.techcyte_credentials_secret.secret_arn,
                "SLIDEBRIDGE_LAUNCHER": "batch",
                "SLIDEBRIDGE_JOB_QUEUE": jobs.job_queue.job_queue_arn,
                # The definition's ARN *with* its revision (CloudFormation's Ref): every change to the job
                # definition is a new revision, which updates this variable in the same deployment, so the
                # function always submits the current revision, and SubmitJob is allowed on that ARN only.
                "SLIDEBRIDGE_JOB_DEFINITION": jobs.job_definition.job_definition_arn,
                **config.outbound_environment(),
                **config.sectra_registration_environment(),
                **(extra_environment or {}),
            },
        )
        storage.grant_table(self.function)
        # Presigned artifact URLs are signed with this function's rights; a cancelled Techcyte run's
        # results (read back from the artifacts) are posted from here too; the Platform API's
        # DELETE /runs/{id}/artifacts removes them.
        storage.grant_objects(self.function, ARTIFACTS_PREFIX, read=True, delete=True)
        # Pathologists' corrections from Sectra.
        storage.grant_objects(self.function, FEEDBACK_PREFIX, write=True)
        storage.grant_webhook_keys_read(self.function)
        storage.grant_techcyte_credentials_read(self.function)
        jobs.grant_submit(self.function)

        access_logs = storage.log_group(self, "AccessLogs", config)
        self.rest_api = apigateway.LambdaRestApi(
            self,
            "RestApi",
            handler=self.function,
            proxy=True,
            rest_api_name=f"slidebridge-{config.stage}",
            description="slidebridge: vendor webhooks and the Platform API",
            endpoint_types=[apigateway.EndpointType.REGIONAL],
            cloud_watch_role=config.api_cloudwatch_role,
            cloud_watch_role_removal_policy=cdk.RemovalPolicy.DESTROY,
            deploy_options=apigateway.StageOptions(
                stage_name=config.stage,
                throttling_rate_limit=config.api_throttle_rate,
                throttling_burst_limit=config.api_throttle_burst,
                metrics_enabled=True,
                tracing_enabled=True,
                access_log_destination=apigateway.LogGroupLogDestination(access_logs),
                # No $context.path: on the vendor routes it contains the secret webhook key. The
                # resource path of the greedy proxy ("/{proxy+}") is safe to log.
                access_log_format=apigateway.AccessLogFormat.json_with_standard_fields(
                    caller=False,
                    http_method=True,
                    ip=True,
                    protocol=True,
                    request_time=True,
                    resource_path=True,
                    response_length=True,
                    status=True,
                    user=False,
                ),
            ),
        )

        for rule_id, reason in (
            (
                "AwsSolutions-APIG2",
                "Bodies are validated by the function with the vendors' pydantic models: vendor payloads "
                "must be accepted leniently and errors answered in the vendor's terms.",
            ),
            (
                "AwsSolutions-APIG4",
                "Vendor webhooks cannot send credentials and carry a secret path key instead; Platform "
                "API bearer tokens are checked by the function (DESIGN §6).",
            ),
            ("AwsSolutions-COG4", "No Cognito: vendors authenticate by path key, Platform API clients by token."),
            (
                "AwsSolutions-APIG6",
                "Access logs are on. Execution logs stay off: they record request paths, which contain "
                "the secret webhook keys.",
            ),
            (
                "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
                "AmazonAPIGatewayPushToCloudWatchLogs]",
                "API Gateway's account-wide logging role uses the AWS-maintained log-pushing policy.",
            ),
        ):
            acknowledge(self.rest_api, rule_id, reason)

        self.waf = Waf(self, "Waf", config=config, stage=self.rest_api.deployment_stage)
