"""Events: failed Batch jobs go to the ``job_events`` function; a schedule runs the deadline sweep.

``JobEvents``: Batch "job FAILED" state changes on our queue go to the ``job_events`` Lambda function.

A job that dies without closing its run (killed, out of memory, spot reclaim after the last attempt,
timeout, cancelled for lack of capacity) still has items in PROCESSING; the function ends them
SYSTEM_ERROR and tells the vendor (DESIGN §4): it writes Sectra's result message and posts Techcyte's
results (reading the stored per-scan results from the artifacts prefix), so it runs in the VPC's private
subnets like the api function. Events that cannot be delivered or handled land in a DLQ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import aws_cdk as cdk
import aws_cdk.aws_events as events
import aws_cdk.aws_events_targets as targets
import aws_cdk.aws_iam as iam
import aws_cdk.aws_lambda as lambda_
import aws_cdk.aws_sqs as sqs
from constructs import Construct

from infra.batch import Jobs
from infra.config import InfraConfig
from infra.functions import python_function
from infra.nag import acknowledge
from infra.network import Network
from infra.storage import ARTIFACTS_PREFIX, Storage

JOB_EVENTS_HANDLER = "lambdas.job_events.handler.handler"
SCHEDULER_HANDLER = "lambdas.scheduler.handler.handler"
# How often runs past their scheduling.deadline are looked for (the job also checks before each item).
DEADLINE_SWEEP_PERIOD = cdk.Duration.minutes(5)


def results_delivery_environment(config: InfraConfig, storage: Storage) -> dict[str, str]:
    """What a function that ends runs needs to post a Techcyte run's results: the data, the Techcyte
    credentials and the outbound allowlists (job_events for dead jobs, the deadline sweep for overdue runs)."""
    return {
        **storage.data_environment(),
        "SLIDEBRIDGE_TECHCYTE_CREDENTIALS_SECRET_ARN": storage.techcyte_credentials_secret.secret_arn,
        **config.outbound_environment(),
    }


def grant_results_delivery(storage: Storage, grantee: iam.IGrantable) -> None:
    """The rights to go with :func:`results_delivery_environment`: the run table, the stored per-scan
    results under the artifacts prefix (read only) and the Techcyte credentials."""
    storage.grant_table(grantee)
    storage.grant_objects(grantee, ARTIFACTS_PREFIX, read=True)
    storage.grant_techcyte_credentials_read(grantee)


class JobEvents(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: InfraConfig,
        code: lambda_.Code,
        storage: Storage,
        jobs: Jobs,
        network: Network,
        layers: Sequence[lambda_.ILayerVersion] = (),
        extra_environment: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(scope, construct_id)

        # SQS-managed encryption: EventBridge may send to it without a KMS key policy grant.
        self.dead_letter_queue = sqs.Queue(
            self,
            "DeadLetters",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=cdk.Duration.days(14),
        )
        acknowledge(
            self.dead_letter_queue,
            "AwsSolutions-SQS3",
            "This queue is itself the dead-letter queue of the job_events rule and function.",
        )

        self.function = python_function(
            self,
            "Function",
            config=config,
            code=code,
            handler=JOB_EVENTS_HANDLER,
            description="slidebridge job_events: closes runs whose Batch job failed",
            timeout=cdk.Duration.seconds(60),
            memory_size=512,
            # Asynchronous invocations that still fail after Lambda's own two retries.
            dead_letter_queue=self.dead_letter_queue,
            storage=storage,
            network=network,
            layers=layers,
            environment={**results_delivery_environment(config, storage), **(extra_environment or {})},
        )
        grant_results_delivery(storage, self.function)

        self.rule = events.Rule(
            self,
            "JobFailed",
            description="slidebridge: a job on our Batch queue FAILED",
            event_pattern=events.EventPattern(
                source=["aws.batch"],
                detail_type=["Batch Job State Change"],
                detail={"status": ["FAILED"], "jobQueue": [jobs.job_queue.job_queue_arn]},
            ),
            targets=[
                targets.LambdaFunction(
                    self.function,
                    dead_letter_queue=self.dead_letter_queue,
                    retry_attempts=8,
                    max_event_age=cdk.Duration.hours(6),
                )
            ],
        )


class DeadlineSweep(Construct):
    """The ``scheduler`` function on a schedule: runs past their deadline are cancelled by the system,
    and runs that never got a job (their creating request was cut short) are closed.

    A cancel stops the run's job (TerminateJob) and, for a Techcyte run, posts its results (stored
    per-scan results from the artifacts prefix, the Techcyte credentials, Techcyte's API through the VPC).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: InfraConfig,
        code: lambda_.Code,
        storage: Storage,
        jobs: Jobs,
        network: Network,
        layers: Sequence[lambda_.ILayerVersion] = (),
        extra_environment: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.function = python_function(
            self,
            "Function",
            config=config,
            code=code,
            handler=SCHEDULER_HANDLER,
            description="slidebridge scheduler: cancels runs past their deadline, closes runs that never got a job",
            timeout=cdk.Duration.minutes(2),
            memory_size=512,
            storage=storage,
            network=network,
            layers=layers,
            environment={
                **results_delivery_environment(config, storage),
                # The launcher only cancels here; it is built from the same settings as the api function's.
                "SLIDEBRIDGE_LAUNCHER": "batch",
                "SLIDEBRIDGE_JOB_QUEUE": jobs.job_queue.job_queue_arn,
                "SLIDEBRIDGE_JOB_DEFINITION": jobs.job_definition.job_definition_arn,
                **(extra_environment or {}),
            },
        )
        grant_results_delivery(storage, self.function)
        jobs.grant_terminate(self.function)

        self.rule = events.Rule(
            self,
            "Schedule",
            description="slidebridge: cancel runs past their deadline",
            schedule=events.Schedule.rate(DEADLINE_SWEEP_PERIOD),
            # A missed sweep is made up by the next one.
            targets=[targets.LambdaFunction(self.function, retry_attempts=0)],
        )
