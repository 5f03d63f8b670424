"""Storage: the KMS key, the data bucket, the run table and the two secrets.

Everything here is encrypted with one customer-managed key, so that who may read runs, slides,
artifacts and vendor credentials is decided by IAM grants on this one key plus the resource.
"""

from __future__ import annotations

import json

import aws_cdk as cdk
import aws_cdk.aws_dynamodb as dynamodb
import aws_cdk.aws_iam as iam
import aws_cdk.aws_kms as kms
import aws_cdk.aws_s3 as s3
import aws_cdk.aws_secretsmanager as secretsmanager
from constructs import Construct

from infra.config import InfraConfig
from infra.nag import acknowledge

# S3 key prefixes; the same defaults as slidebridge.settings.Settings.slides_prefix / artifacts_prefix.
SLIDES_PREFIX = "slides/"
ARTIFACTS_PREFIX = "artifacts/"
# The run table's TTL attribute (epoch seconds): vendor credentials and idempotency records expire.
TTL_ATTRIBUTE = "expires_at"


class Storage(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, config: InfraConfig) -> None:
        super().__init__(scope, construct_id)
        removal = cdk.RemovalPolicy.RETAIN if config.retain_data else cdk.RemovalPolicy.DESTROY

        self.key = kms.Key(
            self,
            "Key",
            alias=f"alias/slidebridge-{config.stage}",
            description="slidebridge: runs, slides, artifacts, vendor credentials, alarm topic",
            enable_key_rotation=True,
            removal_policy=removal,
        )

        self.bucket = s3.Bucket(
            self,
            "Data",
            encryption=s3.BucketEncryption.KMS,
            encryption_key=self.key,
            # One data key per bucket instead of per object: fewer KMS calls for tiles of large slides.
            bucket_key_enabled=True,
            enforce_ssl=True,
            minimum_tls_version=1.2,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            removal_policy=removal,
            auto_delete_objects=False,
            lifecycle_rules=[
                # Slides in transit are copies of what the vendor holds: keep them only while a run may
                # still be retried.
                s3.LifecycleRule(
                    id="expire-slides",
                    prefix=SLIDES_PREFIX,
                    expiration=cdk.Duration.days(config.slides_retention_days),
                ),
                s3.LifecycleRule(
                    id="expire-artifacts",
                    prefix=ARTIFACTS_PREFIX,
                    expiration=cdk.Duration.days(config.artifacts_retention_days),
                ),
                s3.LifecycleRule(
                    id="abort-incomplete-uploads",
                    abort_incomplete_multipart_upload_after=cdk.Duration.days(1),
                ),
            ],
        )
        acknowledge(
            self.bucket,
            "AwsSolutions-S1",
            "Only this stack's roles can reach the bucket (no public or cross-account access); where "
            "per-object auditing is required, CloudTrail S3 data events on the account trail provide it.",
        )

        self.table = dynamodb.Table(
            self,
            "Runs",
            partition_key=dynamodb.Attribute(name="pk", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="sk", type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.CUSTOMER_MANAGED,
            encryption_key=self.key,
            time_to_live_attribute=TTL_ATTRIBUTE,
            deletion_protection=config.retain_data,
            removal_policy=removal,
        )
        self.table.add_global_secondary_index(
            index_name="gsi1",
            partition_key=dynamodb.Attribute(name="gsi1pk", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="gsi1sk", type=dynamodb.AttributeType.STRING),
            projection_type=dynamodb.ProjectionType.ALL,
        )

        # Webhook path keys (DESIGN §6). Secrets Manager generates one value per secret, so each vendor
        # key is generated in a seed secret and the Lambda-facing secret {"sectra", "techcyte"} is
        # assembled from them by CloudFormation dynamic references (the values never enter the
        # template). Only letters and digits: the keys travel as URL path segments.
        seeds = {
            vendor: secretsmanager.Secret(
                self,
                f"{vendor.capitalize()}WebhookKeySeed",
                description=f"slidebridge {config.stage}: generator of the initial {vendor} webhook key",
                encryption_key=self.key,
                removal_policy=removal,
                generate_secret_string=secretsmanager.SecretStringGenerator(
                    password_length=48, exclude_punctuation=True, include_space=False
                ),
            )
            for vendor in ("sectra", "techcyte")
        }
        self.webhook_keys_secret = secretsmanager.Secret(
            self,
            "WebhookKeys",
            description=f"slidebridge {config.stage}: webhook path keys {{sectra, techcyte}}; "
            "rotate with put-secret-value and tell the vendor the new URL",
            encryption_key=self.key,
            removal_policy=removal,
            secret_object_value={vendor: seed.secret_value for vendor, seed in seeds.items()},
        )

        self.techcyte_credentials_secret: secretsmanager.ISecret
        if config.techcyte_credentials_secret_arn:
            self.techcyte_credentials_secret = secretsmanager.Secret.from_secret_complete_arn(
                self, "TechcyteCredentials", config.techcyte_credentials_secret_arn
            )
        else:
            # Techcyte issues the client id and secret; until an operator stores them with
            # put-secret-value, the generated placeholder makes the token exchange fail (and say so).
            self.techcyte_credentials_secret = secretsmanager.Secret(
                self,
                "TechcyteCredentials",
                description=f"slidebridge {config.stage}: Techcyte API client credentials "
                "{client_id, client_secret}; set with put-secret-value",
                encryption_key=self.key,
                removal_policy=removal,
                generate_secret_string=secretsmanager.SecretStringGenerator(
                    secret_string_template=json.dumps({"client_id": ""}),
                    generate_string_key="client_secret",
                    exclude_punctuation=True,
                ),
            )

        acknowledge(
            self,
            "AwsSolutions-SMG4",
            "Webhook keys are shared with the vendors and Techcyte credentials are issued by Techcyte: "
            "both change together with the other party, which a rotation Lambda cannot do.",
        )

    def data_environment(self) -> dict[str, str]:
        """The SLIDEBRIDGE_* variables every runtime component needs to find its data."""
        return {
            "SLIDEBRIDGE_TABLE_NAME": self.table.table_name,
            "SLIDEBRIDGE_BUCKET_NAME": self.bucket.bucket_name,
        }

    def secrets_environment(self) -> dict[str, str]:
        return {
            "SLIDEBRIDGE_WEBHOOK_KEYS_SECRET_ARN": self.webhook_keys_secret.secret_arn,
            "SLIDEBRIDGE_TECHCYTE_CREDENTIALS_SECRET_ARN": self.techcyte_credentials_secret.secret_arn,
        }

    def grant_data_read_write(self, grantee: iam.IGrantable) -> None:
        """Table and bucket read/write (and use of the key for both)."""
        self.table.grant_read_write_data(grantee)
        self.bucket.grant_read_write(grantee)
        if isinstance(grantee, Construct):
            # The wildcards these two grants write, each confined to this bucket, table or key.
            for finding in (
                "Action::s3:Abort*",
                "Action::s3:DeleteObject*",
                "Action::s3:GetBucket*",
                "Action::s3:GetObject*",
                "Action::s3:List*",
                "Action::kms:GenerateDataKey*",
                "Action::kms:ReEncrypt*",
                f"Resource::<{_logical_id(self.bucket)}.Arn>/*",
                f"Resource::<{_logical_id(self.table)}.Arn>/index/*",
            ):
                acknowledge(
                    grantee,
                    f"AwsSolutions-IAM5[{finding}]",
                    "CDK grant on the data bucket (any object key), the run table (its indexes) or the "
                    "stack's KMS key (data-key variants): scoped to that one resource.",
                )

    def grant_secrets_read(self, grantee: iam.IGrantable) -> None:
        self.webhook_keys_secret.grant_read(grantee)
        self.techcyte_credentials_secret.grant_read(grantee)


def _logical_id(construct: Construct) -> str:
    """The CloudFormation logical id of an L2 construct's resource (as cdk-nag names it in findings)."""
    resource = construct.node.default_child
    assert isinstance(resource, cdk.CfnElement)
    return str(cdk.Stack.of(construct).resolve(resource.logical_id))
