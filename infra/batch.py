"""Batch: the VPC, a GPU compute environment that scales to zero, the job queue and the job definition.

Networking choice (config ``job_subnets``): by default the job instances run in *public* subnets with
public IPs and no NAT gateway. Their security group admits nothing inbound; the jobs only call out
(vendor slide downloads of several GB, vendor result APIs, AWS APIs). A NAT gateway would add a fixed
monthly cost plus a per-GB charge on exactly the large slide downloads. S3 and DynamoDB traffic stays
on free gateway endpoints either way. ``job_subnets=private`` puts the instances behind one NAT.
"""

from __future__ import annotations

import aws_cdk as cdk
import aws_cdk.aws_batch as batch
import aws_cdk.aws_ec2 as ec2
import aws_cdk.aws_ecr_assets as ecr_assets
import aws_cdk.aws_ecs as ecs
import aws_cdk.aws_iam as iam
import aws_cdk.aws_logs as logs
from constructs import Construct

from infra.bundle import REPO_ROOT
from infra.config import InfraConfig
from infra.nag import acknowledge
from infra.storage import Storage

# The contract with batch_job/__main__.py (DESIGN §4): 75 = retry, 3 = permanent failure.
EXIT_RETRYABLE = "75"
EXIT_PERMANENT = "3"
RETRY_ATTEMPTS = 3
JOB_VCPUS = 4
JOB_MEMORY_GIB = 15
JOB_GPUS = 1
# Slides are downloaded and tiled here, inside the container. The directory (owned by the image's user)
# lives on the instance's root volume, which the launch template makes large.
SCRATCH_DIR = "/scratch"
# PyTorch data-loader workers pass tiles through /dev/shm; Docker's default of 64 MiB is far too small.
SHARED_MEMORY_GIB = 2


class Jobs(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, config: InfraConfig, storage: Storage) -> None:
        super().__init__(scope, construct_id)

        private = config.job_subnets == "private"
        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            max_azs=2,
            nat_gateways=1 if private else 0,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24),
                *(
                    [ec2.SubnetConfiguration(name="jobs", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=20)]
                    if private
                    else []
                ),
            ],
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3),
                "DynamoDB": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.DYNAMODB),
            },
        )
        # Rejected traffic only: enough to investigate a blocked connection, cheap to keep.
        self.vpc.add_flow_log(
            "RejectedFlows",
            traffic_type=ec2.FlowLogTrafficType.REJECT,
            destination=ec2.FlowLogDestination.to_cloud_watch_logs(
                logs.LogGroup(
                    self,
                    "FlowLogs",
                    retention=config.log_retention,
                    removal_policy=cdk.RemovalPolicy.DESTROY,
                )
            ),
        )

        security_group = ec2.SecurityGroup(
            self,
            "InstanceSecurityGroup",
            vpc=self.vpc,
            description="slidebridge GPU job instances: outbound only",
            allow_all_outbound=True,
        )

        # AWS Batch accepts launch-template user data only as a MIME multi-part archive.
        user_data = ec2.MultipartUserData()
        ecs_config = ec2.UserData.for_linux()
        ecs_config.add_commands(
            # Remove stopped job containers (and their scratch files) after 10 minutes, not 3 hours,
            # so that an instance running job after job does not fill its disk.
            "echo ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION=10m >> /etc/ecs/ecs.config",
            # The image is several GB; reuse it on an instance that already has it.
            "echo ECS_IMAGE_PULL_BEHAVIOR=prefer-cached >> /etc/ecs/ecs.config",
        )
        user_data.add_user_data_part(ecs_config, ec2.MultipartBody.SHELL_SCRIPT, True)
        launch_template = ec2.LaunchTemplate(
            self,
            "LaunchTemplate",
            user_data=user_data,
            # Containers get credentials from the ECS agent, never from instance metadata: hop limit 1
            # keeps the instance role out of their reach.
            http_tokens=ec2.LaunchTemplateHttpTokens.REQUIRED,
            http_put_response_hop_limit=1,
            block_devices=[
                ec2.BlockDevice(
                    # The root volume of the ECS AL2023 AMIs; Docker's storage (and so /scratch) is on it.
                    device_name="/dev/xvda",
                    volume=ec2.BlockDeviceVolume.ebs(
                        config.root_volume_gib,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        encrypted=True,
                        delete_on_termination=True,
                    ),
                )
            ],
        )

        self.compute_environment = batch.ManagedEc2EcsComputeEnvironment(
            self,
            "GpuCompute",
            vpc=self.vpc,
            vpc_subnets=ec2.SubnetSelection(
                subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS if private else ec2.SubnetType.PUBLIC
            ),
            security_groups=[security_group],
            instance_classes=config.gpu_instance_classes,
            use_optimal_instance_classes=False,
            images=[batch.EcsMachineImage(image_type=batch.EcsMachineImageType.ECS_AL2023_NVIDIA)],
            update_to_latest_image_version=True,
            launch_template=launch_template,
            spot=config.spot,
            allocation_strategy=(
                batch.AllocationStrategy.SPOT_PRICE_CAPACITY_OPTIMIZED
                if config.spot
                else batch.AllocationStrategy.BEST_FIT_PROGRESSIVE
            ),
            # Scale to zero between runs: GPU instances are the dominant cost.
            minv_cpus=0,
            maxv_cpus=config.max_vcpus,
        )

        self.job_queue = batch.JobQueue(
            self,
            "Queue",
            priority=1,
            compute_environments=[
                batch.OrderedComputeEnvironment(compute_environment=self.compute_environment, order=1)
            ],
            job_state_time_limit_actions=[
                batch.JobStateTimeLimitAction(
                    max_time=cdk.Duration.minutes(round(config.capacity_wait_hours * 60)),
                    reason=batch.JobStateTimeLimitActionsReason.INSUFFICIENT_INSTANCE_CAPACITY,
                ),
                # The job asks for more than any allowed instance type offers: waiting cannot help.
                batch.JobStateTimeLimitAction(
                    max_time=cdk.Duration.minutes(10),
                    reason=batch.JobStateTimeLimitActionsReason.JOB_RESOURCE_REQUIREMENT,
                ),
            ],
        )

        # Build context is the repository root; .dockerignore narrows it to slidebridge/ and batch_job/.
        # Synth only fingerprints the files: Docker is needed by `cdk deploy` (asset publishing) alone.
        self.image = ecr_assets.DockerImageAsset(
            self,
            "Image",
            directory=str(REPO_ROOT),
            file="batch_job/Dockerfile",
            platform=ecr_assets.Platform.LINUX_AMD64,
        )

        self.job_log_group = logs.LogGroup(
            self, "JobLogs", retention=config.log_retention, removal_policy=cdk.RemovalPolicy.DESTROY
        )
        self.job_role = iam.Role(
            self,
            "JobRole",
            assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
            description="slidebridge batch job: the run table, the data bucket",
        )
        storage.grant_data_read_write(self.job_role)

        container = batch.EcsEc2ContainerDefinition(
            self,
            "Container",
            image=ecs.ContainerImage.from_docker_image_asset(self.image),
            cpu=JOB_VCPUS,
            memory=cdk.Size.gibibytes(JOB_MEMORY_GIB),
            gpu=JOB_GPUS,
            # Only the run id crosses into the job (DESIGN §4); array children read their index from
            # AWS_BATCH_JOB_ARRAY_INDEX.
            command=["python", "-m", "batch_job", "Ref::run_id"],
            job_role=self.job_role,
            linux_parameters=batch.LinuxParameters(
                self,
                "LinuxParameters",
                shared_memory_size=cdk.Size.gibibytes(SHARED_MEMORY_GIB),
                # An init process reaps the tile-decoding workers and forwards SIGTERM on termination.
                init_process_enabled=True,
            ),
            logging=ecs.LogDriver.aws_logs(stream_prefix="job", log_group=self.job_log_group),
            environment={
                **storage.data_environment(),
                **config.outbound_environment(),
                "SLIDEBRIDGE_SCRATCH_DIR": SCRATCH_DIR,
                # The job reports SYSTEM_ERROR itself on its last attempt, so it must know which that is.
                "SLIDEBRIDGE_BATCH_MAX_ATTEMPTS": str(RETRY_ATTEMPTS),
            },
            # Injected by the ECS agent from Secrets Manager: the values never appear in the job
            # definition, the SubmitJob call or DescribeJobs.
            secrets={
                "SLIDEBRIDGE_TECHCYTE_CLIENT_ID": batch.Secret.from_secrets_manager(
                    storage.techcyte_credentials_secret, "client_id"
                ),
                "SLIDEBRIDGE_TECHCYTE_CLIENT_SECRET": batch.Secret.from_secrets_manager(
                    storage.techcyte_credentials_secret, "client_secret"
                ),
            },
        )

        self.job_definition = batch.EcsJobDefinition(
            self,
            "JobDefinition",
            container=container,
            parameters={"run_id": "unset"},
            timeout=cdk.Duration.minutes(round(config.job_timeout_hours * 60)),
            propagate_tags=True,
            retry_attempts=RETRY_ATTEMPTS,
            # Evaluated in order; the first match decides.
            retry_strategies=[
                batch.RetryStrategy.of(batch.Action.RETRY, batch.Reason.custom(on_exit_code=EXIT_RETRYABLE)),
                # Spot reclaim: statusReason "Host EC2 (instance i-...) terminated."
                batch.RetryStrategy.of(batch.Action.RETRY, batch.Reason.SPOT_INSTANCE_RECLAIMED),
                batch.RetryStrategy.of(batch.Action.EXIT, batch.Reason.custom(on_exit_code=EXIT_PERMANENT)),
                # Any other exit code is a crash a retry will not fix. A container that never started
                # has no exit code, matches nothing here and is retried (Batch's default).
                batch.RetryStrategy.of(batch.Action.EXIT, batch.Reason.custom(on_exit_code="*")),
            ],
        )

        acknowledge(
            self.compute_environment,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AmazonEC2ContainerServiceforEC2Role]",
            "Batch container instances need the AWS-maintained ECS instance policy, which follows the "
            "ECS agent's needs.",
        )
        acknowledge(
            container,
            "AwsSolutions-IAM5[Resource::*]",
            "The execution role's ecr:GetAuthorizationToken has no resource-level permissions.",
        )

    def grant_submit(self, grantee: iam.IGrantable) -> None:
        """SubmitJob on this queue and job definition only; TerminateJob (cancel) on jobs."""
        self.job_definition.grant_submit_job(grantee, self.job_queue)
        grantee.grant_principal.add_to_principal_policy(
            iam.PolicyStatement(
                actions=["batch:TerminateJob"],
                resources=[cdk.Stack.of(self).format_arn(service="batch", resource="job", resource_name="*")],
            )
        )
        if isinstance(grantee, Construct):
            acknowledge(
                grantee,
                "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:batch:<AWS::Region>:<AWS::AccountId>:job/*]",
                "Job ids exist only at run time, and TerminateJob offers no condition key for the queue.",
            )
