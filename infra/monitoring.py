"""Monitoring: an alarm topic, a few alarms that mean "a person should look", and a dashboard."""

from __future__ import annotations

import aws_cdk as cdk
import aws_cdk.aws_cloudwatch as cloudwatch
import aws_cdk.aws_cloudwatch_actions as cw_actions
import aws_cdk.aws_iam as iam
import aws_cdk.aws_sns as sns
import aws_cdk.aws_sns_subscriptions as subscriptions
from constructs import Construct

from infra.api import Api
from infra.config import InfraConfig
from infra.events import JobEvents
from infra.storage import Storage

PERIOD = cdk.Duration.minutes(5)


class Monitoring(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: InfraConfig,
        storage: Storage,
        api: Api,
        job_events: JobEvents,
    ) -> None:
        super().__init__(scope, construct_id)

        self.topic = sns.Topic(
            self,
            "Alarms",
            display_name=f"slidebridge {config.stage} alarms",
            master_key=storage.key,
            enforce_ssl=True,
        )
        # CloudWatch publishes alarm notifications to the encrypted topic, so it needs the key.
        storage.key.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],
            )
        )
        if config.alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(config.alarm_email))

        failed_jobs = cloudwatch.Metric(
            namespace="AWS/Events",
            metric_name="MatchedEvents",
            dimensions_map={"RuleName": job_events.rule.rule_name},
            statistic="Sum",
            period=PERIOD,
            label="failed Batch jobs",
        )
        undelivered = cloudwatch.Metric(
            namespace="AWS/Events",
            metric_name="FailedInvocations",
            dimensions_map={"RuleName": job_events.rule.rule_name},
            statistic="Sum",
            period=PERIOD,
            label="job events not delivered",
        )
        api_5xx = api.rest_api.metric_server_error(period=PERIOD, statistic="Sum")
        api_errors = api.function.metric_errors(period=PERIOD, statistic="Sum")
        job_events_errors = job_events.function.metric_errors(period=PERIOD, statistic="Sum")
        dead_letters = job_events.dead_letter_queue.metric_approximate_number_of_messages_visible(
            period=PERIOD, statistic="Maximum"
        )

        self.alarms: dict[str, cloudwatch.Alarm] = {}
        for name, metric, description in (
            ("ApiFunctionErrors", api_errors, "The api Lambda function raised errors."),
            ("Api5xx", api_5xx, "The REST API answered 5xx."),
            ("JobEventsFunctionErrors", job_events_errors, "The job_events Lambda function raised errors."),
            ("FailedJobs", failed_jobs, "A Batch job failed (its run's items ended SYSTEM_ERROR)."),
            ("JobEventsUndelivered", undelivered, "EventBridge could not invoke job_events."),
            ("DeadLetters", dead_letters, "Job events wait in the dead-letter queue: runs may be stuck."),
        ):
            alarm = cloudwatch.Alarm(
                self,
                name,
                alarm_description=f"slidebridge {config.stage}: {description}",
                metric=metric,
                threshold=1,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                # No traffic, no failures: silence is healthy.
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            )
            alarm.add_alarm_action(cw_actions.SnsAction(self.topic))
            self.alarms[name] = alarm

        self.dashboard = cloudwatch.Dashboard(
            self, "Dashboard", dashboard_name=f"slidebridge-{config.stage}", default_interval=cdk.Duration.days(1)
        )
        self.dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(title="Alarms", alarms=list(self.alarms.values()), width=24, height=3),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="API requests",
                left=[
                    api.rest_api.metric_count(period=PERIOD, statistic="Sum"),
                    api.rest_api.metric_client_error(period=PERIOD, statistic="Sum"),
                    api_5xx,
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="API latency (ms)",
                left=[
                    api.rest_api.metric_latency(period=PERIOD, statistic="p50"),
                    api.rest_api.metric_latency(period=PERIOD, statistic="p99"),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Lambda errors",
                left=[api_errors, job_events_errors],
                right=[api.function.metric_throttles(period=PERIOD, statistic="Sum")],
                width=8,
            ),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Failed jobs", left=[failed_jobs, undelivered], width=12),
            cloudwatch.GraphWidget(title="Dead letters", left=[dead_letters], width=12),
        )
