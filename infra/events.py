"""Events: Batch "job FAILED" state changes on our queue go to the ``job_events`` Lambda function.

A job that dies without closing its run (killed, out of memory, spot reclaim after the last attempt,
timeout, cancelled for lack of capacity) still has items in PROCESSING; the function ends them
SYSTEM_ERROR and tells the vendor (DESIGN §4). Events that cannot be delivered or handled land in a DLQ.
"""

from __future__ import annotations

import aws_cdk as cdk
import aws_cdk.aws_events as events
import aws_cdk.aws_events_targets as targets
import aws_cdk.aws_lambda as lambda_
import aws_cdk.aws_sqs as sqs
from constructs import Construct

from infra.batch import Jobs
from infra.config import InfraConfig
from infra.functions import python_function
from infra.nag import acknowledge
from infra.storage import Storage

JOB_EVENTS_HANDLER = "lambdas.job_events.handler.handler"


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
            environment={
                **storage.data_environment(),
                **storage.secrets_environment(),
                **config.outbound_environment(),
            },
        )
        storage.grant_data_read_write(self.function)
        storage.grant_secrets_read(self.function)

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
