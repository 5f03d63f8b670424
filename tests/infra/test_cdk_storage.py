"""Storage: the data bucket, the run table and the secrets, as synthesised."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aws_cdk.assertions import Match

from slidebridge.store import TABLE_DEFINITION, TTL_ATTRIBUTE

if TYPE_CHECKING:
    from conftest import Synthesized


def test_bucket_is_kms_encrypted_with_the_stack_key(synth: Synthesized) -> None:
    _, bucket = synth.one("AWS::S3::Bucket")
    key_id = synth.logical_id(synth.stack.storage.key)
    (rule,) = bucket["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms",
        "KMSMasterKeyID": {"Fn::GetAtt": [key_id, "Arn"]},
    }
    assert rule["BucketKeyEnabled"] is True


def test_bucket_blocks_public_access(synth: Synthesized) -> None:
    _, bucket = synth.one("AWS::S3::Bucket")
    assert bucket["Properties"]["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }


def test_bucket_policy_denies_requests_without_tls(synth: Synthesized) -> None:
    bucket_id = synth.logical_id(synth.stack.storage.bucket)
    synth.template.has_resource_properties(
        "AWS::S3::BucketPolicy",
        {
            "Bucket": {"Ref": bucket_id},
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Effect": "Deny",
                                "Action": "s3:*",
                                "Principal": {"AWS": "*"},
                                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                            }
                        )
                    ]
                )
            },
        },
    )


def test_lifecycle_expires_slides_per_config_and_artifacts_after_30_days(synth: Synthesized) -> None:
    _, bucket = synth.one("AWS::S3::Bucket")
    rules = {rule.get("Prefix"): rule for rule in bucket["Properties"]["LifecycleConfiguration"]["Rules"]}
    # slides_retention_days=5 in the test context (default 7)
    assert rules["slides/"]["ExpirationInDays"] == 5
    assert rules["slides/"]["Status"] == "Enabled"
    assert rules["artifacts/"]["ExpirationInDays"] == 30
    assert rules[None]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}


def test_table_keys_gsi_billing(synth: Synthesized) -> None:
    _, table = synth.one("AWS::DynamoDB::Table")
    props = table["Properties"]
    assert props["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert {(a["AttributeName"], a["AttributeType"]) for a in props["AttributeDefinitions"]} == {
        ("pk", "S"),
        ("sk", "S"),
        ("gsi1pk", "S"),
        ("gsi1sk", "S"),
    }
    (gsi,) = props["GlobalSecondaryIndexes"]
    assert gsi["IndexName"] == "gsi1"
    assert gsi["KeySchema"] == [
        {"AttributeName": "gsi1pk", "KeyType": "HASH"},
        {"AttributeName": "gsi1sk", "KeyType": "RANGE"},
    ]
    assert props["BillingMode"] == "PAY_PER_REQUEST"


def test_table_has_pitr_ttl_and_kms(synth: Synthesized) -> None:
    _, table = synth.one("AWS::DynamoDB::Table")
    props = table["Properties"]
    assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert props["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert props["SSESpecification"]["SSEEnabled"] is True
    assert props["SSESpecification"]["SSEType"] == "KMS"


def test_data_is_retained_when_the_stack_is_deleted(synth: Synthesized) -> None:
    for cfn_type in ("AWS::S3::Bucket", "AWS::DynamoDB::Table", "AWS::KMS::Key"):
        _, resource = synth.one(cfn_type)
        assert resource["DeletionPolicy"] == "Retain", cfn_type


def _secret_string_parts(resource: dict[str, Any]) -> list[Any]:
    secret_string = resource["Properties"]["SecretString"]
    assert set(secret_string) == {"Fn::Join"}
    separator, parts = secret_string["Fn::Join"]
    assert separator == ""
    return list(parts)


def test_webhook_keys_secret_holds_generated_keys_per_vendor(synth: Synthesized) -> None:
    webhook_id = synth.logical_id(synth.stack.storage.webhook_keys_secret)
    parts = _secret_string_parts(synth.resources[webhook_id])
    # Every value is a dynamic reference to a generated secret: the literal text carries no key.
    literal = "".join(part for part in parts if isinstance(part, str))
    assert literal.count("{{resolve:secretsmanager:") == 2
    referenced = [part["Ref"] for part in parts if isinstance(part, dict)]
    assert len(set(referenced)) == 2
    for seed_id in referenced:
        generator = synth.resources[seed_id]["Properties"]["GenerateSecretString"]
        # The keys travel as URL path segments: letters and digits only, and long.
        assert generator["ExcludePunctuation"] is True
        assert generator["PasswordLength"] >= 32
    # Substituting placeholders for the references leaves the JSON the api function parses.
    rendered = "".join(part if isinstance(part, str) else "X" for part in parts)
    rendered = rendered.replace("{{resolve:secretsmanager:X:SecretString:::}}", "KEY")
    assert json.loads(rendered) == {"sectra": "KEY", "techcyte": "KEY"}


def test_techcyte_credentials_secret_has_both_fields(synth: Synthesized) -> None:
    secret_id = synth.logical_id(synth.stack.storage.techcyte_credentials_secret)
    generator = synth.resources[secret_id]["Properties"]["GenerateSecretString"]
    assert json.loads(generator["SecretStringTemplate"]) == {"client_id": ""}
    assert generator["GenerateStringKey"] == "client_secret"


def test_secrets_are_encrypted_with_the_stack_key(synth: Synthesized) -> None:
    key_arn = {"Fn::GetAtt": [synth.logical_id(synth.stack.storage.key), "Arn"]}
    secrets = synth.of_type("AWS::SecretsManager::Secret")
    assert len(secrets) == 4  # webhook keys, its two seeds, Techcyte credentials
    assert all(secret["Properties"]["KmsKeyId"] == key_arn for secret in secrets.values())


def test_every_log_group_is_encrypted_with_the_stack_key(synth: Synthesized) -> None:
    key_arn = {"Fn::GetAtt": [synth.logical_id(synth.stack.storage.key), "Arn"]}
    log_groups = synth.of_type("AWS::Logs::LogGroup")
    # api, job_events, job_metrics, scheduler functions; API access logs; job logs; VPC flow logs
    assert len(log_groups) == 7
    assert {name: group["Properties"].get("KmsKeyId") for name, group in log_groups.items()} == {
        name: key_arn for name in log_groups
    }


def test_key_lets_cloudwatch_logs_use_it_for_this_accounts_log_groups_only(synth: Synthesized) -> None:
    key = synth.resources[synth.logical_id(synth.stack.storage.key)]["Properties"]
    (statement,) = [
        s
        for s in key["KeyPolicy"]["Statement"]
        if "Service" in s.get("Principal", {}) and "logs." in json.dumps(s["Principal"]["Service"])
    ]
    assert "kms:GenerateDataKey*" in statement["Action"]
    condition = statement["Condition"]["ArnLike"]["kms:EncryptionContext:aws:logs:arn"]
    assert condition == {
        "Fn::Join": [
            "",
            [
                "arn:",
                {"Ref": "AWS::Partition"},
                ":logs:",
                {"Ref": "AWS::Region"},
                ":",
                {"Ref": "AWS::AccountId"},
                ":log-group:*",
            ],
        ]
    }


def test_table_is_the_one_the_run_store_expects(synth: Synthesized) -> None:
    _, table = synth.one("AWS::DynamoDB::Table")
    props = table["Properties"]
    assert props["KeySchema"] == TABLE_DEFINITION["KeySchema"]
    assert sorted(props["AttributeDefinitions"], key=str) == sorted(TABLE_DEFINITION["AttributeDefinitions"], key=str)
    (gsi,) = props["GlobalSecondaryIndexes"]
    (expected,) = TABLE_DEFINITION["GlobalSecondaryIndexes"]
    assert (gsi["IndexName"], gsi["KeySchema"], gsi["Projection"]) == (
        expected["IndexName"],
        expected["KeySchema"],
        expected["Projection"],
    )
    # Stored vendor credentials expire through this attribute (RunStore.expire_credentials).
    assert props["TimeToLiveSpecification"] == {"AttributeName": TTL_ATTRIBUTE, "Enabled": True}
