"""Monitoring: job metrics, an alarm topic, alarms that mean "a person should look", and a dashboard.

The ``job_metrics`` function turns the batch job's log lines into metrics (a subscription on the job's
log group; see lambdas/job_metrics/handler.py for why not metric filters) and measures the queue's
backlog every 5 minutes. Every custom metric is in the ``Slidebridge`` namespace with the dimension
``service=slidebridge-<stage>``.
"""

from __future__ import annotations

import aws_cdk as cdk
import aws_cdk.aws_cloudwatch as cloudwatch
import aws_cdk.aws_cloudwatch_actions as cw_actions
import aws_cdk.aws_events as events
import aws_cdk.aws_events_targets as targets
import aws_cdk.aws_iam as iam
import aws_cdk.aws_lambda as lambda_
import aws_cdk.aws_logs as logs
import aws_cdk.aws_logs_destinations as logs_destinations
import aws_cdk.aws_sns as sns
import aws_cdk.aws_sns_subscriptions as subscriptions
from constructs import Construct

from infra.api import Api
from infra.batch import Jobs
from infra.config import InfraConfig
from infra.events import DeadlineSweep, JobEvents
from infra.functions import METRICS_NAMESPACE, powertools_service, python_function
from infra.nag import acknowledge
from infra.storage import Storage

PERIOD = cdk.Duration.minutes(5)
JOB_METRICS_HANDLER = "lambdas.job_metrics.handler.handler"
# Lines of the job's log that the job_metrics function reads (lambdas.job_metrics.handler.SUBSCRIPTION_TERMS).
JOB_LOG_TERMS = ("item metrics", "item failed", "transient failure")
# The scheduler's log message when it closed runs that never got a job (lambdas/scheduler/handler.py).
NEVER_STARTED_LOG_MESSAGE = "closed runs that never got a job"
# The job's processing stages, as batch_job/pipeline.py times them ("<Stage>Seconds" metrics).
JOB_STAGES = ("download", "open", "analyse", "artifacts", "delivery")
# "analyse" split further (batch_job/analyze.py AnalysisTimings; "Analyse<Stage>Seconds" metrics).
ANALYSE_STAGES = ("tissue", "tiles_classify", "regions")


class Monitoring(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: InfraConfig,
        code: lambda_.Code,
        storage: Storage,
        api: Api,
        jobs: Jobs,
        job_events: JobEvents,
        deadline_sweep: DeadlineSweep,
    ) -> None:
        super().__init__(scope, construct_id)
        service = powertools_service(config)

        def custom(name: str, statistic: str, label: str, **dimensions: str) -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace=METRICS_NAMESPACE,
                metric_name=name,
                dimensions_map={"service": service, **dimensions},
                statistic=statistic,
                period=PERIOD,
                label=label,
            )

        # Not in the VPC: it reads its events and calls only the Batch API.
        self.job_metrics_function = python_function(
            self,
            "JobMetricsFunction",
            config=config,
            code=code,
            handler=JOB_METRICS_HANDLER,
            description="slidebridge job_metrics: job log lines and queue backlog as CloudWatch metrics",
            timeout=cdk.Duration.seconds(60),
            memory_size=256,
            storage=storage,
            environment={"SLIDEBRIDGE_JOB_QUEUE": jobs.job_queue.job_queue_arn},
        )
        self.job_metrics_function.add_to_role_policy(iam.PolicyStatement(actions=["batch:ListJobs"], resources=["*"]))
        acknowledge(
            self.job_metrics_function,
            "AwsSolutions-IAM5[Resource::*]",
            "Active tracing (X-Ray) and batch:ListJobs have no resource-level permissions; ListJobs is read-only.",
        )
        self.job_log_subscription = logs.SubscriptionFilter(
            self,
            "JobLogSubscription",
            log_group=jobs.job_log_group,
            destination=logs_destinations.LambdaDestination(self.job_metrics_function),
            filter_pattern=logs.FilterPattern.any_term(*JOB_LOG_TERMS),
        )
        self.backlog_schedule = events.Rule(
            self,
            "QueueBacklogSchedule",
            description="slidebridge: measure the Batch queue's backlog",
            schedule=events.Schedule.rate(PERIOD),
            targets=[targets.LambdaFunction(self.job_metrics_function, retry_attempts=0)],
        )

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
        job_metrics_errors = self.job_metrics_function.metric_errors(period=PERIOD, statistic="Sum")
        scheduler_errors = deadline_sweep.function.metric_errors(period=PERIOD, statistic="Sum")
        dead_letters = job_events.dead_letter_queue.metric_approximate_number_of_messages_visible(
            period=PERIOD, statistic="Maximum"
        )
        # Runs the scheduler found without a job (their creating request was cut short): each one is
        # a pathologist or a Platform API user whose request went nowhere.
        never_started_filter = logs.MetricFilter(
            self,
            "RunsNeverStartedFilter",
            log_group=deadline_sweep.function.log_group,
            filter_pattern=logs.FilterPattern.string_value("$.message", "=", NEVER_STARTED_LOG_MESSAGE),
            metric_namespace=METRICS_NAMESPACE,
            metric_name="RunsNeverStarted",
            metric_value="1",
        )
        never_started = never_started_filter.metric(statistic="Sum", period=PERIOD, label="runs that never got a job")
        oldest_queued = custom("OldestQueuedJobAgeSeconds", "Maximum", "oldest queued job (s)")
        queued = custom("QueuedJobs", "Maximum", "queued jobs")

        self.alarms: dict[str, cloudwatch.Alarm] = {}
        for name, metric, description in (
            ("ApiFunctionErrors", api_errors, "The api Lambda function raised errors."),
            ("Api5xx", api_5xx, "The REST API answered 5xx."),
            ("JobEventsFunctionErrors", job_events_errors, "The job_events Lambda function raised errors."),
            ("FailedJobs", failed_jobs, "A Batch job failed (its run's items ended SYSTEM_ERROR)."),
            ("JobEventsUndelivered", undelivered, "EventBridge could not invoke job_events."),
            ("DeadLetters", dead_letters, "Job events wait in the dead-letter queue: runs may be stuck."),
            ("JobMetricsFunctionErrors", job_metrics_errors, "The job_metrics Lambda function raised errors."),
            ("SchedulerFunctionErrors", scheduler_errors, "The scheduler (deadline sweep) Lambda raised errors."),
            ("RunsNeverStarted", never_started, "Runs got no job (their request was cut short); they were closed."),
            (
                "OldestQueuedJob",
                oldest_queued,
                f"A job has waited over {config.queue_age_alarm_minutes} minutes for a GPU instance.",
            ),
        ):
            alarm = cloudwatch.Alarm(
                self,
                name,
                alarm_description=f"slidebridge {config.stage}: {description}",
                metric=metric,
                threshold=config.queue_age_alarm_minutes * 60 if name == "OldestQueuedJob" else 1,
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
                left=[api_errors, job_events_errors, job_metrics_errors, scheduler_errors],
                right=[api.function.metric_throttles(period=PERIOD, statistic="Sum")],
                width=8,
            ),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Failed jobs", left=[failed_jobs, undelivered, never_started], width=8),
            cloudwatch.GraphWidget(title="Queue backlog", left=[queued], right=[oldest_queued], width=8),
            cloudwatch.GraphWidget(title="Dead letters", left=[dead_letters], width=8),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Slides processed",
                left=[custom("SlidesProcessed", "Sum", "slides"), custom("ItemRetries", "Sum", "retried items")],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Tiles per second (per slide)",
                left=[
                    custom("TilesPerSecond", "p50", "p50 tiles/s"),
                    custom("TilesPerSecond", "Minimum", "slowest slide"),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Item errors by code",
                # Codes are open-ended (one per kind of input problem): a search finds every one.
                left=[
                    cloudwatch.MathExpression(
                        expression=(
                            f'SEARCH(\'{{{METRICS_NAMESPACE},error_code,service}} MetricName="ItemErrors" '
                            f"service=\"{service}\"', 'Sum', {PERIOD.to_seconds()})"
                        ),
                        # One series per code, named by it.
                        label="${PROP('Dim.error_code')}",
                        period=PERIOD,
                    )
                ],
                width=8,
            ),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Seconds per stage (p50 per slide)",
                left=[custom(f"{stage.title()}Seconds", "p50", stage) for stage in JOB_STAGES],
                stacked=True,
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Analysis: sub-stages (p50 s) and classifier idle (%)",
                left=[
                    custom("Analyse" + stage.title().replace("_", "") + "Seconds", "p50", stage)
                    for stage in ANALYSE_STAGES
                ],
                # Near 0: tile reading keeps the classifier busy. High: decoding (vCPUs) is the limit.
                right=[custom("ClassifierWaitPercent", "p50", "classifier waited for tiles (%)")],
                stacked=True,
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Requests by front door",
                left=[custom("Requests", "Sum", door, front_door=door) for door in ("sectra", "techcyte", "platform")],
                right=[
                    custom("ServerErrors", "Sum", f"{door} 5xx", front_door=door)
                    for door in ("sectra", "techcyte", "platform")
                ],
                width=8,
            ),
        )
