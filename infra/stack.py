"""``SlidebridgeStack`` composes the capabilities; ``create_app`` is the CDK app that app.py synthesises.

The stack is environment-agnostic (no account or region in the code): synth needs no AWS account and
no context lookups, and ``cdk deploy`` targets whatever account and region the CLI credentials name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import aws_cdk.aws_lambda as lambda_
from constructs import Construct

from infra import ca_bundle
from infra.api import Api
from infra.batch import Jobs
from infra.bundle import REPO_ROOT, check_bundle
from infra.config import InfraConfig
from infra.events import DeadlineSweep, JobEvents
from infra.monitoring import Monitoring
from infra.nag import apply_checks
from infra.network import Network
from infra.storage import Storage


class SlidebridgeStack(cdk.Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: InfraConfig,
        lambda_asset_dir: Path,
        **kwargs: Any,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.config = config

        # One directory, one asset: both functions run the same slidebridge + lambdas code.
        code = lambda_.Code.from_asset(str(lambda_asset_dir))

        self.storage = Storage(self, "Storage", config=config)
        self.network = Network(self, "Network", config=config, storage=self.storage)
        self.jobs = Jobs(self, "Batch", config=config, storage=self.storage, network=self.network)

        # The hospital CA bundle, for the two functions that call Sectra servers and Techcyte.
        layers: list[lambda_.ILayerVersion] = []
        function_ca: dict[str, str] = {}
        hospital_pem = config.ca_bundle_pem
        if hospital_pem:
            layers.append(ca_bundle.lambda_layer(self, "CaBundle", hospital_pem))
            function_ca["SLIDEBRIDGE_CA_BUNDLE"] = ca_bundle.LAMBDA_CA_BUNDLE

        self.api = Api(
            self,
            "Api",
            config=config,
            code=code,
            storage=self.storage,
            jobs=self.jobs,
            network=self.network,
            layers=layers,
            extra_environment=function_ca,
        )
        self.job_events = JobEvents(
            self,
            "JobEvents",
            config=config,
            code=code,
            storage=self.storage,
            jobs=self.jobs,
            network=self.network,
            layers=layers,
            extra_environment=function_ca,
        )
        self.deadline_sweep = DeadlineSweep(
            self,
            "DeadlineSweep",
            config=config,
            code=code,
            storage=self.storage,
            jobs=self.jobs,
            network=self.network,
            layers=layers,
            extra_environment=function_ca,
        )
        self.monitoring = Monitoring(
            self,
            "Monitoring",
            config=config,
            code=code,
            storage=self.storage,
            api=self.api,
            jobs=self.jobs,
            job_events=self.job_events,
            deadline_sweep=self.deadline_sweep,
        )

        for name, text in (
            ("download_hosts", config.download_hosts),
            ("sectra_callback_hosts", config.sectra_callback_hosts),
        ):
            if not text:
                cdk.Annotations.of(self).add_warning_v2(
                    f"slidebridge:empty-{name}",
                    f"CDK context '{name}' is empty: every such URL will be refused at run time.",
                )

        cdk.CfnOutput(self, "ApiUrl", value=self.api.rest_api.url, description="base URL of every route")
        # The keys themselves stay in Secrets Manager: outputs are readable by anyone who may describe the
        # stack. README "Deploying to AWS" prints the complete URLs.
        for vendor in ("sectra", "techcyte"):
            cdk.CfnOutput(
                self,
                f"{vendor.capitalize()}WebhookUrlTemplate",
                value=f"{self.api.rest_api.url}hooks/{vendor}/<{vendor} key from WebhookKeysSecretArn>",
                description=f"the {vendor} webhook URL, with the key from the webhook-keys secret",
            )
        cdk.CfnOutput(
            self,
            "WebhookKeysSecretArn",
            value=self.storage.webhook_keys_secret.secret_arn,
            description="{sectra, techcyte} path keys: webhook URL = ApiUrl + hooks/<vendor>/<key>",
        )
        cdk.CfnOutput(
            self,
            "TechcyteCredentialsSecretArn",
            value=self.storage.techcyte_credentials_secret.secret_arn,
            description="put the Techcyte client_id and client_secret here",
        )
        cdk.CfnOutput(self, "BucketName", value=self.storage.bucket.bucket_name)
        cdk.CfnOutput(self, "TableName", value=self.storage.table.table_name)
        cdk.CfnOutput(self, "JobQueueArn", value=self.jobs.job_queue.job_queue_arn)
        cdk.CfnOutput(self, "AlarmTopicArn", value=self.monitoring.topic.topic_arn)
        cdk.CfnOutput(self, "DashboardName", value=self.monitoring.dashboard.dashboard_name)
        cdk.CfnOutput(self, "JobLogGroupName", value=self.jobs.job_log_group.log_group_name)
        cdk.CfnOutput(self, "VpcId", value=self.network.vpc.vpc_id)

        cdk.Tags.of(self).add("project", "slidebridge")
        cdk.Tags.of(self).add("stage", config.stage)


def create_app(
    context: Mapping[str, Any] | None = None, *, outdir: str | None = None
) -> tuple[cdk.App, SlidebridgeStack]:
    """The slidebridge CDK app with AWS Solutions checks (cdk-nag) applied to every construct.

    ``context`` adds to the CDK context (tests use it; ``cdk synth -c`` reaches the app through the
    CLI). Raises ``InfraConfigError`` for a bad context value and ``BundleError`` when the Lambda
    bundle is missing or stale.
    """
    app = cdk.App(context=dict(context) if context else None, outdir=outdir)
    config = InfraConfig.from_context(app.node)
    asset_dir = Path(config.lambda_asset_dir)
    if not asset_dir.is_absolute():
        asset_dir = REPO_ROOT / asset_dir
    check_bundle(asset_dir, allow_stub=config.allow_stub_lambda_bundle)

    stack = SlidebridgeStack(
        app,
        f"slidebridge-{config.stage}",
        config=config,
        lambda_asset_dir=asset_dir,
        description="slidebridge: whole-slide-image classifier behind Sectra, Techcyte and the Platform API",
    )
    # Findings at error level fail `cdk synth`; the accepted ones are suppressed with reasons next to
    # the constructs that cause them.
    apply_checks(app)
    return app, stack
