"""API: the REST API, the api function, its environment and its permissions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import certifi

if TYPE_CHECKING:
    from conftest import BuiltApp, Synthesized


def _function(synth: Synthesized, construct: Any) -> dict[str, Any]:
    props: dict[str, Any] = synth.resources[synth.logical_id(construct)]["Properties"]
    return props


def _api_policy_id(synth: Synthesized) -> str:
    role = synth.stack.api.function.role
    assert role is not None
    return synth.logical_id(role.node.find_child("DefaultPolicy"))


def _statements(synth: Synthesized) -> list[tuple[str, dict[str, Any]]]:
    """(policy logical id, statement) for every statement of every IAM policy in the stack."""
    found = []
    for policy_id, policy in synth.of_type("AWS::IAM::Policy").items():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            found.append((policy_id, statement))
    return found


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_rest_api_is_a_regional_lambda_proxy(synth: Synthesized) -> None:
    _, api = synth.one("AWS::ApiGateway::RestApi")
    assert api["Properties"]["EndpointConfiguration"] == {"Types": ["REGIONAL"]}
    function_id = synth.logical_id(synth.stack.api.function)

    methods = synth.of_type("AWS::ApiGateway::Method")
    # ANY on "/" and on the greedy "/{proxy+}": every route reaches the function's resolver.
    assert len(methods) == 2
    for method in methods.values():
        props = method["Properties"]
        assert props["HttpMethod"] == "ANY"
        assert props["Integration"]["Type"] == "AWS_PROXY"
        uri = str(props["Integration"]["Uri"])
        assert function_id in uri
    (resource,) = synth.of_type("AWS::ApiGateway::Resource").values()
    assert resource["Properties"]["PathPart"] == "{proxy+}"


def test_stage_is_throttled_and_access_logged_without_paths(synth: Synthesized) -> None:
    _, stage = synth.one("AWS::ApiGateway::Stage")
    props = stage["Properties"]
    assert props["StageName"] == "test"
    (settings,) = props["MethodSettings"]
    assert settings["ThrottlingRateLimit"] == 20
    assert settings["ThrottlingBurstLimit"] == 40
    log_format = props["AccessLogSetting"]["Format"]
    assert "$context.requestId" in log_format
    assert "$context.status" in log_format
    # The request path of a vendor route contains its secret key.
    assert "$context.path" not in log_format
    assert "DataTraceEnabled" not in settings or settings["DataTraceEnabled"] is False


def test_api_function_runtime(synth: Synthesized) -> None:
    props = _function(synth, synth.stack.api.function)
    assert props["Runtime"] == "python3.12"
    assert props["Handler"] == "lambdas.api.handler.handler"
    # The bundle's wheels are manylinux2014_x86_64.
    assert props["Architectures"] == ["x86_64"]
    assert props["Timeout"] == 29
    assert props["MemorySize"] >= 512


def test_api_function_environment(synth: Synthesized) -> None:
    variables = _function(synth, synth.stack.api.function)["Environment"]["Variables"]
    storage, jobs = synth.stack.storage, synth.stack.jobs
    assert variables == {
        # One metrics "service" per stage: two stages in one account keep their metrics apart.
        "POWERTOOLS_SERVICE_NAME": "slidebridge-test",
        "POWERTOOLS_METRICS_NAMESPACE": "Slidebridge",
        "SLIDEBRIDGE_TABLE_NAME": {"Ref": synth.logical_id(storage.table)},
        "SLIDEBRIDGE_BUCKET_NAME": {"Ref": synth.logical_id(storage.bucket)},
        "SLIDEBRIDGE_ARTIFACTS_PREFIX": "artifacts/",
        "SLIDEBRIDGE_FEEDBACK_PREFIX": "feedback/",
        # The bucket's artifact lifecycle (expire-artifacts), so expired files read DELETED_BY_SYSTEM.
        "SLIDEBRIDGE_ARTIFACTS_RETENTION_DAYS": "30",
        "SLIDEBRIDGE_LAUNCHER": "batch",
        "SLIDEBRIDGE_JOB_QUEUE": {"Fn::GetAtt": [synth.logical_id(jobs.job_queue), "JobQueueArn"]},
        "SLIDEBRIDGE_JOB_DEFINITION": {"Ref": synth.logical_id(jobs.job_definition)},
        "SLIDEBRIDGE_WEBHOOK_KEYS_SECRET_ARN": {"Ref": synth.logical_id(storage.webhook_keys_secret)},
        "SLIDEBRIDGE_TECHCYTE_CREDENTIALS_SECRET_ARN": {"Ref": synth.logical_id(storage.techcyte_credentials_secret)},
        # From the test context; blanks after commas are dropped.
        "SLIDEBRIDGE_DOWNLOAD_HOSTS": "slides.example.org,*.s3.eu-west-1.amazonaws.com",
        "SLIDEBRIDGE_SECTRA_CALLBACK_HOSTS": "pacs.example.org:8443",
        "SLIDEBRIDGE_OUTBOUND_TRUSTED_NETWORKS": "",
        "SLIDEBRIDGE_TECHCYTE_API_URL": "https://api.ci.techcyte.com/api/v3",
    }


def test_sectra_registration_settings_reach_the_api_function_when_configured(variant: Synthesized) -> None:
    variables = _function(variant, variant.stack.api.function)["Environment"]["Variables"]
    assert variables["SLIDEBRIDGE_PUBLIC_URL"] == "https://slides.hospital.example/ai"
    assert variables["SLIDEBRIDGE_SECTRA_APPLICATION_ID"] == "he-tissue-lab"
    assert variables["SLIDEBRIDGE_SECTRA_DISPLAY_NAME"] == "Lab H&E tissue"
    assert json.loads(variables["SLIDEBRIDGE_SECTRA_CONTEXT"]) == {"autoRun": True}
    # Only the api function shows the registration.
    job_events = _function(variant, variant.stack.job_events.function)["Environment"]["Variables"]
    for name in ("SLIDEBRIDGE_PUBLIC_URL", "SLIDEBRIDGE_SECTRA_APPLICATION_ID", "SLIDEBRIDGE_SECTRA_CONTEXT"):
        assert name not in job_events


def test_sectra_registration_settings_are_absent_by_default(synth: Synthesized) -> None:
    variables = _function(synth, synth.stack.api.function)["Environment"]["Variables"]
    assert "SLIDEBRIDGE_PUBLIC_URL" not in variables
    assert "SLIDEBRIDGE_SECTRA_APPLICATION_ID" not in variables


def test_only_the_api_function_may_submit_and_only_to_our_queue_and_definition(synth: Synthesized) -> None:
    jobs = synth.stack.jobs
    api_policy_id = _api_policy_id(synth)
    submitting = [
        (policy_id, statement)
        for policy_id, statement in _statements(synth)
        if any(action in ("batch:SubmitJob", "batch:*", "*") for action in _as_list(statement["Action"]))
    ]
    assert [policy_id for policy_id, _ in submitting] == [api_policy_id]
    (_, statement) = submitting[0]
    assert statement["Effect"] == "Allow"
    assert _as_list(statement["Action"]) == ["batch:SubmitJob"]
    assert sorted(map(str, _as_list(statement["Resource"]))) == sorted(
        [
            str({"Ref": synth.logical_id(jobs.job_definition)}),
            str({"Fn::GetAtt": [synth.logical_id(jobs.job_queue), "JobQueueArn"]}),
        ]
    )


def test_api_function_may_terminate_jobs_and_read_both_secrets(synth: Synthesized) -> None:
    api_policy_id = _api_policy_id(synth)
    statements = [statement for policy_id, statement in _statements(synth) if policy_id == api_policy_id]
    actions = {action for statement in statements for action in _as_list(statement["Action"])}
    assert "batch:TerminateJob" in actions
    storage = synth.stack.storage
    secret_reads = [
        resource
        for statement in statements
        if "secretsmanager:GetSecretValue" in _as_list(statement["Action"])
        for resource in _as_list(statement["Resource"])
    ]
    assert sorted(map(str, secret_reads)) == sorted(
        [
            str({"Ref": synth.logical_id(storage.webhook_keys_secret)}),
            str({"Ref": synth.logical_id(storage.techcyte_credentials_secret)}),
        ]
    )
    assert "dynamodb:PutItem" in actions
    assert not {action for action in actions if action.endswith(":*") or action == "*"}


def _s3_grants(synth: Synthesized, policy_id: str) -> dict[str, set[str]]:
    """Object-key pattern (after the bucket ARN) → S3 actions, for one policy."""
    bucket_arn = {"Fn::GetAtt": [synth.logical_id(synth.stack.storage.bucket), "Arn"]}
    grants: dict[str, set[str]] = {}
    for statement in synth.resources[policy_id]["Properties"]["PolicyDocument"]["Statement"]:
        actions = {a for a in _as_list(statement["Action"]) if a.startswith("s3:")}
        if not actions:
            continue
        for resource in _as_list(statement["Resource"]):
            assert resource != bucket_arn, "no bucket-level S3 rights (listing)"
            parts = resource["Fn::Join"][1]
            assert parts[0] == bucket_arn, resource
            grants.setdefault(parts[1], set()).update(actions)
    return grants


def test_api_function_reaches_only_the_artifacts_and_feedback_prefixes(synth: Synthesized) -> None:
    assert _s3_grants(synth, _api_policy_id(synth)) == {
        # Presigned artifact URLs carry the function's rights; DELETE /runs/{id}/artifacts removes them;
        # the API never writes them.
        "/artifacts/*": {"s3:GetObject", "s3:DeleteObject"},
        # Sectra feedback is written, never read back.
        "/feedback/*": {"s3:PutObject", "s3:AbortMultipartUpload"},
    }


def _web_acl(synth: Synthesized) -> dict[str, Any]:
    _, acl = synth.one("AWS::WAFv2::WebACL")
    props: dict[str, Any] = acl["Properties"]
    return props


def _rules(synth: Synthesized) -> dict[str, dict[str, Any]]:
    return {rule["Name"]: rule for rule in _web_acl(synth)["Rules"]}


def test_waf_guards_the_rest_api_stage(synth: Synthesized) -> None:
    acl_id, _ = synth.one("AWS::WAFv2::WebACL")
    _, association = synth.one("AWS::WAFv2::WebACLAssociation")
    props = association["Properties"]
    assert props["WebACLArn"] == {"Fn::GetAtt": [acl_id, "Arn"]}
    stage_id, _ = synth.one("AWS::ApiGateway::Stage")
    assert {"Ref": stage_id} in props["ResourceArn"]["Fn::Join"][1]
    acl = _web_acl(synth)
    assert acl["Scope"] == "REGIONAL"
    assert acl["DefaultAction"] == {"Allow": {}}
    # Without waf_allowed_cidrs there is no allowlist: rate, size and known-bad-input rules, in that order.
    assert [rule["Name"] for rule in sorted(acl["Rules"], key=lambda r: r["Priority"])] == [
        "rate-limit",
        "size-limits",
        "known-bad-inputs",
    ]
    assert not synth.of_type("AWS::WAFv2::IPSet")


def test_waf_rate_rule_blocks_per_source_ip(synth: Synthesized) -> None:
    rule = _rules(synth)["rate-limit"]
    assert rule["Action"] == {"Block": {}}
    statement = rule["Statement"]["RateBasedStatement"]
    assert statement["AggregateKeyType"] == "IP"
    assert statement["Limit"] == 1000  # cdk.json's waf_rate_limit
    assert statement["EvaluationWindowSec"] == 300


def test_waf_size_rule_limits_paths_queries_and_webhook_bodies(synth: Synthesized) -> None:
    rule = _rules(synth)["size-limits"]
    assert rule["Action"] == {"Block": {}}
    uri, query, webhook = rule["Statement"]["OrStatement"]["Statements"]
    assert uri["SizeConstraintStatement"]["FieldToMatch"] == {"UriPath": {}}
    assert uri["SizeConstraintStatement"]["Size"] == 2048
    assert query["SizeConstraintStatement"]["FieldToMatch"] == {"QueryString": {}}
    path_match, body_size = webhook["AndStatement"]["Statements"]
    assert path_match["ByteMatchStatement"]["SearchString"] == "/hooks/"
    body = body_size["SizeConstraintStatement"]
    assert body["ComparisonOperator"] == "GT"
    assert body["Size"] == 64 * 1024
    # A body beyond what WAF inspects counts as too large, and WAF inspects exactly the limit.
    assert body["FieldToMatch"] == {"Body": {"OversizeHandling": "MATCH"}}
    assert _web_acl(synth)["AssociationConfig"] == {
        "RequestBody": {"API_GATEWAY": {"DefaultSizeInspectionLimit": "KB_64"}}
    }


def test_waf_allowlist_blocks_every_other_source(variant: Synthesized) -> None:
    rules = _rules(variant)
    allowlist = rules["source-ip-allowlist"]
    assert allowlist["Priority"] == 0
    assert allowlist["Action"] == {"Block": {}}
    ip_sets = variant.of_type("AWS::WAFv2::IPSet")
    by_version = {s["Properties"]["IPAddressVersion"]: s["Properties"]["Addresses"] for s in ip_sets.values()}
    assert by_version == {"IPV4": ["203.0.113.0/24", "198.51.100.7/32"], "IPV6": ["2001:db8::/32"]}
    references = allowlist["Statement"]["NotStatement"]["Statement"]["OrStatement"]["Statements"]
    assert sorted(r["IPSetReferenceStatement"]["Arn"]["Fn::GetAtt"][0] for r in references) == sorted(ip_sets)
    # 16 KB is WAF's default inspection size: no (extra-cost) association config.
    assert "AssociationConfig" not in _web_acl(variant)
    assert (
        rules["size-limits"]["Statement"]["OrStatement"]["Statements"][2]["AndStatement"]["Statements"][1][
            "SizeConstraintStatement"
        ]["Size"]
        == 16 * 1024
    )


def test_api_function_runs_in_the_private_subnets(synth: Synthesized) -> None:
    config = _function(synth, synth.stack.api.function)["VpcConfig"]
    private = {synth.logical_id(subnet) for subnet in synth.stack.network.vpc.private_subnets}
    assert {ref["Ref"] for ref in config["SubnetIds"]} == private
    assert config["SecurityGroupIds"] == [
        {"Fn::GetAtt": [synth.logical_id(synth.stack.network.function_security_group), "GroupId"]}
    ]


def test_hospital_ca_layer_holds_public_roots_and_the_hospital_ca(
    variant: Synthesized, variant_app: BuiltApp, hospital_ca: Path
) -> None:
    layers = variant.of_type("AWS::Lambda::LayerVersion")
    (layer_id,) = layers
    for function in (variant.stack.api.function, variant.stack.job_events.function):
        assert _function(variant, function)["Layers"] == [{"Ref": layer_id}]
    assert "Layers" not in _function(variant, variant.stack.monitoring.job_metrics_function)
    bundles = list(variant_app.outdir.glob("asset.*/ca/ca-bundle.pem"))
    (bundle,) = bundles
    text = bundle.read_text()
    assert text.rstrip().endswith(hospital_ca.read_text().rstrip())
    # The public roots come first: slidebridge trusts only this file once it is set.
    assert text.count("-----BEGIN CERTIFICATE-----") > 100
    assert Path(certifi.where()).read_text().splitlines()[-1] in text


def test_outputs_name_the_api_url_and_webhook_urls_without_their_keys(synth: Synthesized) -> None:
    outputs = synth.template.to_json()["Outputs"]
    for name in ("ApiUrl", "WebhookKeysSecretArn", "TechcyteCredentialsSecretArn", "DashboardName", "JobQueueArn"):
        assert name in outputs, name
    for vendor in ("Sectra", "Techcyte"):
        value = json.dumps(outputs[f"{vendor}WebhookUrlTemplate"]["Value"])
        assert f"hooks/{vendor.lower()}/<{vendor.lower()} key from WebhookKeysSecretArn>" in value
    # Outputs are readable by anyone who may describe the stack: no secret value is resolved into one.
    assert "resolve:secretsmanager" not in json.dumps(outputs)
