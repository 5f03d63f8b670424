"""Events: failed jobs on our queue reach the job_events function; undeliverable events are kept."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import Synthesized


def test_rule_matches_failed_jobs_of_our_queue_only(synth: Synthesized) -> None:
    rule = synth.resources[synth.logical_id(synth.stack.job_events.rule)]
    queue_id = synth.logical_id(synth.stack.jobs.job_queue)
    assert rule["Properties"]["EventPattern"] == {
        "source": ["aws.batch"],
        "detail-type": ["Batch Job State Change"],
        "detail": {"status": ["FAILED"], "jobQueue": [{"Fn::GetAtt": [queue_id, "JobQueueArn"]}]},
    }


def test_rule_targets_job_events_function_with_a_dead_letter_queue(synth: Synthesized) -> None:
    rule = synth.resources[synth.logical_id(synth.stack.job_events.rule)]
    function_id = synth.logical_id(synth.stack.job_events.function)
    queue_id = synth.logical_id(synth.stack.job_events.dead_letter_queue)
    (target,) = rule["Properties"]["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": [function_id, "Arn"]}
    assert target["DeadLetterConfig"] == {"Arn": {"Fn::GetAtt": [queue_id, "Arn"]}}
    # EventBridge may invoke the function, from this rule only.
    rule_arn = {"Fn::GetAtt": [synth.logical_id(synth.stack.job_events.rule), "Arn"]}
    permissions = [
        p["Properties"]
        for p in synth.of_type("AWS::Lambda::Permission").values()
        if p["Properties"]["Principal"] == "events.amazonaws.com"
        and p["Properties"]["FunctionName"] == {"Fn::GetAtt": [function_id, "Arn"]}
    ]
    assert [p["SourceArn"] for p in permissions] == [rule_arn]


def test_job_events_function_shares_the_code_and_storage_settings(synth: Synthesized) -> None:
    job_events = synth.resources[synth.logical_id(synth.stack.job_events.function)]["Properties"]
    api = synth.resources[synth.logical_id(synth.stack.api.function)]["Properties"]
    assert job_events["Runtime"] == "python3.12"
    assert job_events["Handler"] == "lambdas.job_events.handler.handler"
    assert job_events["Code"] == api["Code"]
    variables = job_events["Environment"]["Variables"]
    for name in (
        "SLIDEBRIDGE_TABLE_NAME",
        "SLIDEBRIDGE_BUCKET_NAME",
        "SLIDEBRIDGE_ARTIFACTS_PREFIX",
        "SLIDEBRIDGE_TECHCYTE_CREDENTIALS_SECRET_ARN",
        "SLIDEBRIDGE_DOWNLOAD_HOSTS",
        "SLIDEBRIDGE_SECTRA_CALLBACK_HOSTS",
        "SLIDEBRIDGE_OUTBOUND_TRUSTED_NETWORKS",
        "SLIDEBRIDGE_TECHCYTE_API_URL",
    ):
        assert variables[name] == api["Environment"]["Variables"][name], name
    # It never checks a webhook key, and never submits a job.
    assert "SLIDEBRIDGE_WEBHOOK_KEYS_SECRET_ARN" not in variables
    assert "SLIDEBRIDGE_JOB_DEFINITION" not in variables
    # Failed asynchronous invocations are kept too.
    assert job_events["DeadLetterConfig"] == {
        "TargetArn": {"Fn::GetAtt": [synth.logical_id(synth.stack.job_events.dead_letter_queue), "Arn"]}
    }


def _policy_statements(synth: Synthesized) -> list[dict[str, Any]]:
    role = synth.stack.job_events.function.role
    assert role is not None
    policy_id = synth.logical_id(role.node.find_child("DefaultPolicy"))
    statements: list[dict[str, Any]] = synth.resources[policy_id]["Properties"]["PolicyDocument"]["Statement"]
    return statements


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_job_events_reads_artifacts_and_the_techcyte_secret_only(synth: Synthesized) -> None:
    statements = _policy_statements(synth)
    storage = synth.stack.storage
    s3 = [
        (sorted(_as_list(s["Action"])), s["Resource"])
        for s in statements
        if any(action.startswith("s3:") for action in _as_list(s["Action"]))
    ]
    bucket_arn = {"Fn::GetAtt": [synth.logical_id(storage.bucket), "Arn"]}
    # Techcyte results are read back from the artifacts prefix to be posted; nothing is written there.
    assert s3 == [(["s3:GetObject"], {"Fn::Join": ["", [bucket_arn, "/artifacts/*"]]})]
    secrets = [
        resource
        for s in statements
        if "secretsmanager:GetSecretValue" in _as_list(s["Action"])
        for resource in _as_list(s["Resource"])
    ]
    assert secrets == [{"Ref": synth.logical_id(storage.techcyte_credentials_secret)}]
    actions = {a for s in statements for a in _as_list(s["Action"])}
    assert not {a for a in actions if a.startswith("batch:")}


def test_job_events_runs_in_the_private_subnets_to_reach_sectra_and_techcyte(synth: Synthesized) -> None:
    job_events = synth.resources[synth.logical_id(synth.stack.job_events.function)]["Properties"]
    api = synth.resources[synth.logical_id(synth.stack.api.function)]["Properties"]
    assert job_events["VpcConfig"] == api["VpcConfig"]
    private = {synth.logical_id(subnet) for subnet in synth.stack.network.vpc.private_subnets}
    assert {ref["Ref"] for ref in job_events["VpcConfig"]["SubnetIds"]} == private


def test_deadline_sweep_runs_the_scheduler_every_five_minutes(synth: Synthesized) -> None:
    sweep = synth.stack.deadline_sweep
    function_id = synth.logical_id(sweep.function)
    props = synth.resources[function_id]["Properties"]
    assert props["Handler"] == "lambdas.scheduler.handler.handler"
    rule = synth.resources[synth.logical_id(sweep.rule)]["Properties"]
    assert rule["ScheduleExpression"] == "rate(5 minutes)"
    assert [target["Arn"] for target in rule["Targets"]] == [{"Fn::GetAtt": [function_id, "Arn"]}]
    # Cancelling a Techcyte run posts its results: same network as job_events.
    job_events = synth.resources[synth.logical_id(synth.stack.job_events.function)]["Properties"]
    assert props["VpcConfig"] == job_events["VpcConfig"]


def test_scheduler_may_stop_jobs_but_not_submit_them(synth: Synthesized) -> None:
    role = synth.stack.deadline_sweep.function.role
    assert role is not None
    policy_id = synth.logical_id(role.node.find_child("DefaultPolicy"))
    statements = synth.resources[policy_id]["Properties"]["PolicyDocument"]["Statement"]
    actions = {a for s in statements for a in _as_list(s["Action"])}
    assert "batch:TerminateJob" in actions
    assert "batch:SubmitJob" not in actions
    assert "secretsmanager:GetSecretValue" in actions
    secrets = [
        r
        for s in statements
        if "secretsmanager:GetSecretValue" in _as_list(s["Action"])
        for r in _as_list(s["Resource"])
    ]
    assert secrets == [{"Ref": synth.logical_id(synth.stack.storage.techcyte_credentials_secret)}]
