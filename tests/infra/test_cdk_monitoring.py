"""Monitoring: alarms on the failure signals, wired to the alarm topic."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import Synthesized

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def _alarm(synth: Synthesized, name: str) -> dict[str, Any]:
    alarm = synth.stack.monitoring.alarms[name]
    props: dict[str, Any] = synth.resources[synth.logical_id(alarm)]["Properties"]
    return props


def test_oldest_queued_job_alarm(synth: Synthesized) -> None:
    props = _alarm(synth, "OldestQueuedJob")
    (query,) = props["Metrics"]
    stat = query["MetricStat"]
    assert stat["Metric"]["Namespace"] == "Slidebridge"
    assert stat["Metric"]["MetricName"] == "OldestQueuedJobAgeSeconds"
    assert stat["Metric"]["Dimensions"] == [{"Name": "service", "Value": "slidebridge-test"}]
    assert stat["Stat"] == "Maximum"
    assert props["Threshold"] == 60 * 60  # queue_age_alarm_minutes, default 60
    assert props["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert props["AlarmActions"] == [{"Ref": synth.logical_id(synth.stack.monitoring.topic)}]


def test_job_metrics_function_reads_the_job_log_and_the_queue(synth: Synthesized) -> None:
    monitoring, jobs = synth.stack.monitoring, synth.stack.jobs
    function_id = synth.logical_id(monitoring.job_metrics_function)
    props = synth.resources[function_id]["Properties"]
    assert props["Handler"] == "lambdas.job_metrics.handler.handler"
    assert props["Environment"]["Variables"]["SLIDEBRIDGE_JOB_QUEUE"] == {
        "Fn::GetAtt": [synth.logical_id(jobs.job_queue), "JobQueueArn"]
    }
    # It needs no network access beyond AWS APIs.
    assert "VpcConfig" not in props

    _, subscription = synth.one("AWS::Logs::SubscriptionFilter")
    sub = subscription["Properties"]
    assert sub["LogGroupName"] == {"Ref": synth.logical_id(jobs.job_log_group)}
    assert sub["DestinationArn"] == {"Fn::GetAtt": [function_id, "Arn"]}
    assert sub["FilterPattern"] == '?"item metrics" ?"item failed" ?"transient failure"'

    schedule = synth.resources[synth.logical_id(monitoring.backlog_schedule)]["Properties"]
    assert schedule["ScheduleExpression"] == "rate(5 minutes)"
    assert [target["Arn"] for target in schedule["Targets"]] == [{"Fn::GetAtt": [function_id, "Arn"]}]

    role = monitoring.job_metrics_function.role
    assert role is not None
    policy = synth.resources[synth.logical_id(role.node.find_child("DefaultPolicy"))]["Properties"]
    actions = {a for s in policy["PolicyDocument"]["Statement"] for a in s["Action"]}
    assert actions == {"batch:ListJobs", "xray:PutTelemetryRecords", "xray:PutTraceSegments"}


def test_subscription_terms_match_what_the_function_parses() -> None:
    from infra.monitoring import JOB_LOG_TERMS  # noqa: PLC0415
    from lambdas.job_metrics.handler import SUBSCRIPTION_TERMS  # noqa: PLC0415

    assert JOB_LOG_TERMS == SUBSCRIPTION_TERMS


def test_metrics_namespace_is_the_one_the_lambdas_write_to() -> None:
    from infra.functions import METRICS_NAMESPACE as INFRA  # noqa: PLC0415
    from lambdas.observability import METRICS_NAMESPACE as LAMBDAS  # noqa: PLC0415

    assert INFRA == LAMBDAS


def test_dashboard_shows_job_metrics_and_queue_backlog(synth: Synthesized) -> None:
    _, dashboard = synth.one("AWS::CloudWatch::Dashboard")
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    for metric in (
        "SlidesProcessed",
        "TilesPerSecond",
        "DownloadSeconds",
        "AnalyseSeconds",
        "DeliverySeconds",
        "AnalyseTissueSeconds",
        "AnalyseTilesClassifySeconds",
        "AnalyseRegionsSeconds",
        "ClassifierWaitPercent",
        "QueuedJobs",
        "OldestQueuedJobAgeSeconds",
        "ServerErrors",
    ):
        assert metric in body, metric
    assert "SEARCH(" in body and "ItemErrors" in body and "slidebridge-test" in body


def test_job_stages_are_the_ones_the_pipeline_times() -> None:
    from infra.monitoring import JOB_STAGES  # noqa: PLC0415

    source = (REPO_ROOT / "batch_job" / "pipeline.py").read_text()
    timed = re.findall(r'timer\.start\("([a-z_]+)"\)', source)
    assert set(JOB_STAGES) == set(timed)


def test_dashboard_analysis_stages_are_the_ones_the_job_reports() -> None:
    from batch_job.analyze import AnalysisTimings  # noqa: PLC0415
    from infra.monitoring import ANALYSE_STAGES  # noqa: PLC0415

    assert tuple(AnalysisTimings().seconds()) == ANALYSE_STAGES


def test_runs_that_never_got_a_job_raise_an_alarm_from_the_scheduler_log(synth: Synthesized) -> None:
    from infra.monitoring import NEVER_STARTED_LOG_MESSAGE  # noqa: PLC0415

    [(_, metric_filter)] = [
        (k, v)
        for k, v in synth.of_type("AWS::Logs::MetricFilter").items()
        if v["Properties"]["MetricTransformations"][0]["MetricName"] == "RunsNeverStarted"
    ]
    props = metric_filter["Properties"]
    assert props["FilterPattern"] == f'{{ $.message = "{NEVER_STARTED_LOG_MESSAGE}" }}'
    sweep_logs = synth.stack.deadline_sweep.function.log_group
    assert props["LogGroupName"] == {"Ref": synth.logical_id(sweep_logs)}
    alarm = _alarm(synth, "RunsNeverStarted")
    (query,) = alarm["Metrics"]
    assert query["MetricStat"]["Metric"]["MetricName"] == "RunsNeverStarted"
    assert alarm["Threshold"] == 1
