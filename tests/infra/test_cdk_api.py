"""API: the REST API, the api function, its environment and its permissions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import Synthesized


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
        "POWERTOOLS_SERVICE_NAME": "slidebridge",
        "POWERTOOLS_METRICS_NAMESPACE": "Slidebridge",
        "SLIDEBRIDGE_TABLE_NAME": {"Ref": synth.logical_id(storage.table)},
        "SLIDEBRIDGE_BUCKET_NAME": {"Ref": synth.logical_id(storage.bucket)},
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
    # Read/write on the table and the bucket, nothing broader.
    assert "dynamodb:PutItem" in actions
    assert "s3:PutObject" in actions
    assert not {action for action in actions if action.endswith(":*") or action == "*"}
