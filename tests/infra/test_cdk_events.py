"""Events: failed jobs on our queue reach the job_events function; undeliverable events are kept."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Synthesized


def test_rule_matches_failed_jobs_of_our_queue_only(synth: Synthesized) -> None:
    _, rule = synth.one("AWS::Events::Rule")
    queue_id = synth.logical_id(synth.stack.jobs.job_queue)
    assert rule["Properties"]["EventPattern"] == {
        "source": ["aws.batch"],
        "detail-type": ["Batch Job State Change"],
        "detail": {"status": ["FAILED"], "jobQueue": [{"Fn::GetAtt": [queue_id, "JobQueueArn"]}]},
    }


def test_rule_targets_job_events_function_with_a_dead_letter_queue(synth: Synthesized) -> None:
    _, rule = synth.one("AWS::Events::Rule")
    function_id = synth.logical_id(synth.stack.job_events.function)
    queue_id = synth.logical_id(synth.stack.job_events.dead_letter_queue)
    (target,) = rule["Properties"]["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": [function_id, "Arn"]}
    assert target["DeadLetterConfig"] == {"Arn": {"Fn::GetAtt": [queue_id, "Arn"]}}
    # EventBridge may invoke the function.
    permissions = [
        p["Properties"]
        for p in synth.of_type("AWS::Lambda::Permission").values()
        if p["Properties"]["Principal"] == "events.amazonaws.com"
    ]
    assert [p["FunctionName"] for p in permissions] == [{"Fn::GetAtt": [function_id, "Arn"]}]


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
        "SLIDEBRIDGE_WEBHOOK_KEYS_SECRET_ARN",
        "SLIDEBRIDGE_TECHCYTE_CREDENTIALS_SECRET_ARN",
        "SLIDEBRIDGE_SECTRA_CALLBACK_HOSTS",
        "SLIDEBRIDGE_TECHCYTE_API_URL",
    ):
        assert variables[name] == api["Environment"]["Variables"][name], name
    # Failed asynchronous invocations are kept too.
    assert job_events["DeadLetterConfig"] == {
        "TargetArn": {"Fn::GetAtt": [synth.logical_id(synth.stack.job_events.dead_letter_queue), "Arn"]}
    }
