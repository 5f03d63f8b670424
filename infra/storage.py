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
import aws_cdk.aws_logs as logs
import aws_cdk.aws_s3 as s3
import aws_cdk.aws_secretsmanager as secretsmanager
from constructs import Construct

from infra.config import InfraConfig
from infra.nag import acknowledge

# S3 key prefixes. The stack sets them on every component explicitly (SLIDEBRIDGE_*_PREFIX), so that the
# lifecycle rules and the prefix-scoped grants below always describe the keys the code writes.
SLIDES_PREFIX = "slides/"
ARTIFACTS_PREFIX = "artifacts/"
# Pathologists' corrections from Sectra (written by the api function); kept, no lifecycle rule.
FEEDBACK_PREFIX = "feedback/"
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
        # CloudWatch Logs encrypts this stack's log groups with the key (Lambda, job, API access, flow logs).
        # The service needs the key policy's leave, limited to log groups of this account and region.
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal(f"logs.{cdk.Aws.REGION}.amazonaws.com")],
                actions=["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"],
                resources=["*"],
                conditions={
                    "ArnLike": {
                        "kms:EncryptionContext:aws:logs:arn": cdk.Stack.of(self).format_arn(
                            service="logs",
                            resource="log-group",
                            resource_name="*",
                            arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME,
                        )
                    }
                },
            )
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

    def log_group(self, scope: Construct, construct_id: str, config: InfraConfig) -> logs.LogGroup:
        """A log group encrypted with the stack's key, kept for the configured retention."""
        return logs.LogGroup(
            scope,
            construct_id,
            retention=config.log_retention,
            encryption_key=self.key,
            removal_policy=cdk.RemovalPolicy.DESTROY,
        )

    def data_environment(self) -> dict[str, str]:
        """The SLIDEBRIDGE_* variables every runtime component needs to find its data."""
        return {
            "SLIDEBRIDGE_TABLE_NAME": self.table.table_name,
            "SLIDEBRIDGE_BUCKET_NAME": self.bucket.bucket_name,
            "SLIDEBRIDGE_ARTIFACTS_PREFIX": ARTIFACTS_PREFIX,
        }

    def grant_table(self, grantee: iam.IGrantable) -> None:
        """Read/write on the run table and its index (and the key, for the table's encryption)."""
        self.table.grant_read_write_data(grantee)
        self._acknowledge_grants(grantee, f"Resource::<{_logical_id(self.table)}.Arn>/index/*")

    def grant_objects(
        self, grantee: iam.IGrantable, prefix: str, *, read: bool = False, write: bool = False, delete: bool = False
    ) -> None:
        """Objects under one key prefix of the data bucket, nothing else of it (no listing).

        ``read``: GetObject (also what a presigned GET URL is signed for). ``write``: PutObject, with
        AbortMultipartUpload for the multipart uploads of large artifacts. ``delete``: DeleteObject (also
        what DeleteObjects needs per key).
        """
        actions = [
            *(["s3:GetObject"] if read else []),
            *(["s3:PutObject", "s3:AbortMultipartUpload"] if write else []),
            *(["s3:DeleteObject"] if delete else []),
        ]
        if not actions:
            raise ValueError("grant_objects needs read, write or delete")
        grantee.grant_principal.add_to_principal_policy(
            iam.PolicyStatement(actions=actions, resources=[self.bucket.arn_for_objects(f"{prefix}*")])
        )
        # SSE-KMS: reading decrypts; writing generates a data key (and multipart completion decrypts).
        if write:
            self.key.grant_encrypt_decrypt(grantee)
        else:
            self.key.grant_decrypt(grantee)
        self._acknowledge_grants(grantee, f"Resource::<{_logical_id(self.bucket)}.Arn>/{prefix}*")

    def grant_webhook_keys_read(self, grantee: iam.IGrantable) -> None:
        self.webhook_keys_secret.grant_read(grantee)

    def grant_techcyte_credentials_read(self, grantee: iam.IGrantable) -> None:
        self.techcyte_credentials_secret.grant_read(grantee)

    @staticmethod
    def _acknowledge_grants(grantee: iam.IGrantable, resource_finding: str) -> None:
        if not isinstance(grantee, Construct):
            return
        # The wildcards these grants write, each confined to this bucket prefix, table or key.
        for finding in ("Action::kms:GenerateDataKey*", "Action::kms:ReEncrypt*", resource_finding):
            acknowledge(
                grantee,
                f"AwsSolutions-IAM5[{finding}]",
                "Grant on the data bucket (objects under one key prefix), the run table (its indexes) or the "
                "stack's KMS key (data-key variants): scoped to that one resource.",
            )


def _logical_id(construct: Construct) -> str:
    """The CloudFormation logical id of an L2 construct's resource (as cdk-nag names it in findings)."""
    resource = construct.node.default_child
    assert isinstance(resource, cdk.CfnElement)
    return str(cdk.Stack.of(construct).resolve(resource.logical_id))
