"""Monitoring: alarms on the failure signals, wired to the alarm topic."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Synthesized


def test_alarms_cover_function_errors_api_5xx_and_failed_jobs(synth: Synthesized) -> None:
    alarms = synth.of_type("AWS::CloudWatch::Alarm")
    topic_id = synth.logical_id(synth.stack.monitoring.topic)
    watched = set()
    for alarm in alarms.values():
        props = alarm["Properties"]
        assert props["AlarmActions"] == [{"Ref": topic_id}]
        assert props["TreatMissingData"] == "notBreaching"
        # A metric with a label is written in the "Metrics" form.
        metric = props["Metrics"][0]["MetricStat"]["Metric"] if "Metrics" in props else props
        dimensions = {d["Name"]: d["Value"] for d in metric.get("Dimensions", [])}
        watched.add((metric["Namespace"], metric["MetricName"], str(sorted(dimensions.items()))))

    api_function = {"Ref": synth.logical_id(synth.stack.api.function)}
    job_events_function = {"Ref": synth.logical_id(synth.stack.job_events.function)}
    rule = {"Ref": synth.logical_id(synth.stack.job_events.rule)}
    api_name = synth.stack.resolve(synth.stack.api.rest_api.rest_api_name)
    expected = {
        ("AWS/Lambda", "Errors", str([("FunctionName", api_function)])),
        ("AWS/Lambda", "Errors", str([("FunctionName", job_events_function)])),
        ("AWS/ApiGateway", "5XXError", str([("ApiName", api_name)])),
        ("AWS/Events", "MatchedEvents", str([("RuleName", rule)])),
    }
    assert expected <= watched


def test_alarm_topic_is_encrypted_and_mails_the_configured_address(synth: Synthesized) -> None:
    _, topic = synth.one("AWS::SNS::Topic")
    assert topic["Properties"]["KmsMasterKeyId"] == {"Fn::GetAtt": [synth.logical_id(synth.stack.storage.key), "Arn"]}
    _, subscription = synth.one("AWS::SNS::Subscription")
    assert subscription["Properties"]["Protocol"] == "email"
    assert subscription["Properties"]["Endpoint"] == "ops@example.org"


def test_dashboard_exists(synth: Synthesized) -> None:
    _, dashboard = synth.one("AWS::CloudWatch::Dashboard")
    assert dashboard["Properties"]["DashboardName"] == "slidebridge-test"
