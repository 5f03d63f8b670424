"""Batch: GPU compute environments that scale to zero, the job queue and the job definition.

The queue tries a spot compute environment first and an on-demand one second (``on_demand_max_vcpus``;
with ``spot=false`` there is only the on-demand one). AWS Batch places a job in the second environment
when the first cannot take it: it is at its ``max_vcpus``, or it cannot offer a fitting instance. A job
that waits for spot capacity the first environment has not given up on stays RUNNABLE; the "oldest
queued job" alarm tells, and after ``capacity_wait_hours`` the queue cancels it (job_events closes it).

The instances run in the network's job subnets (``infra.network``), with a security group that admits
nothing inbound.
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

from infra import ca_bundle
from infra.bundle import REPO_ROOT
from infra.config import MIN_VCPUS, InfraConfig
from infra.nag import acknowledge
from infra.network import Network
from infra.storage import ARTIFACTS_PREFIX, Storage

# The contract with batch_job/__main__.py (DESIGN §4): 75 = retry, 3 = permanent failure.
EXIT_RETRYABLE = "75"
EXIT_PERMANENT = "3"
RETRY_ATTEMPTS = 3
JOB_VCPUS = MIN_VCPUS
JOB_MEMORY_GIB = 15
JOB_GPUS = 1
# Slides are downloaded and tiled here, inside the container. The directory (owned by the image's user)
# lives on the instance's root volume, which the launch template makes large.
SCRATCH_DIR = "/scratch"
# PyTorch data-loader workers pass tiles through /dev/shm; Docker's default of 64 MiB is far too small.
SHARED_MEMORY_GIB = 2


class Jobs(Construct):
    def __init__(
        self, scope: Construct, construct_id: str, *, config: InfraConfig, storage: Storage, network: Network
    ) -> None:
        super().__init__(scope, construct_id)

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
        hospital_pem = config.ca_bundle_pem
        if hospital_pem:
            ecs_config.add_commands(*ca_bundle.instance_commands(hospital_pem))
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
                    # Multi-GB slides are downloaded, unpacked (DICOM series) and tiled there.
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

        # One instance role for both compute environments.
        instance_role = iam.Role(
            self,
            "InstanceRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="slidebridge GPU job instances: the ECS agent",
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name("service-role/AmazonEC2ContainerServiceforEC2Role")
            ],
        )
        acknowledge(
            instance_role,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AmazonEC2ContainerServiceforEC2Role]",
            "Batch container instances need the AWS-maintained ECS instance policy, which follows the "
            "ECS agent's needs.",
        )

        def compute_environment(
            construct_id: str, *, spot: bool, max_vcpus: int
        ) -> batch.ManagedEc2EcsComputeEnvironment:
            return batch.ManagedEc2EcsComputeEnvironment(
                self,
                construct_id,
                vpc=network.vpc,
                vpc_subnets=network.job_subnets,
                security_groups=[network.job_security_group],
                instance_classes=config.gpu_instance_classes,
                use_optimal_instance_classes=False,
                images=[batch.EcsMachineImage(image_type=batch.EcsMachineImageType.ECS_AL2023_NVIDIA)],
                update_to_latest_image_version=True,
                launch_template=launch_template,
                instance_role=instance_role,
                spot=spot,
                allocation_strategy=(
                    batch.AllocationStrategy.SPOT_PRICE_CAPACITY_OPTIMIZED
                    if spot
                    else batch.AllocationStrategy.BEST_FIT_PROGRESSIVE
                ),
                # Scale to zero between runs: GPU instances are the dominant cost.
                minv_cpus=0,
                maxv_cpus=max_vcpus,
            )

        self.compute_environments: list[batch.ManagedEc2EcsComputeEnvironment] = []
        if config.spot:
            self.compute_environments.append(compute_environment("GpuSpot", spot=True, max_vcpus=config.max_vcpus))
            if config.on_demand_max_vcpus:
                self.compute_environments.append(
                    compute_environment("GpuOnDemand", spot=False, max_vcpus=config.on_demand_max_vcpus)
                )
        else:
            self.compute_environments.append(compute_environment("GpuOnDemand", spot=False, max_vcpus=config.max_vcpus))

        self.job_queue = batch.JobQueue(
            self,
            "Queue",
            priority=1,
            # Tried in this order: spot first, on-demand second.
            compute_environments=[
                batch.OrderedComputeEnvironment(compute_environment=environment, order=order)
                for order, environment in enumerate(self.compute_environments, start=1)
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

        self.job_log_group: logs.ILogGroup = storage.log_group(self, "JobLogs", config)
        self.job_role = iam.Role(
            self,
            "JobRole",
            assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
            description="slidebridge batch job: the run table, the artifacts prefix of the data bucket",
        )
        storage.grant_table(self.job_role)
        # Artifacts are written here, and the Techcyte results of a run's other items read back.
        storage.grant_objects(self.job_role, ARTIFACTS_PREFIX, read=True, write=True)

        environment = {
            **storage.data_environment(),
            **config.outbound_environment(),
            "SLIDEBRIDGE_SCRATCH_DIR": SCRATCH_DIR,
            # The job reports SYSTEM_ERROR itself on its last attempt, so it must know which that is.
            "SLIDEBRIDGE_BATCH_MAX_ATTEMPTS": str(RETRY_ATTEMPTS),
        }
        volumes: list[batch.EcsVolume] = []
        if hospital_pem:
            environment["SLIDEBRIDGE_CA_BUNDLE"] = ca_bundle.JOB_CA_BUNDLE
            volumes.append(
                batch.EcsVolume.host(
                    name="ca-bundle",
                    host_path=ca_bundle.JOB_CA_DIR,
                    container_path=ca_bundle.JOB_CA_DIR,
                    readonly=True,
                )
            )

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
            environment=environment,
            volumes=volumes or None,
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
            container,
            "AwsSolutions-IAM5[Resource::*]",
            "The execution role's ecr:GetAuthorizationToken has no resource-level permissions.",
        )

    def grant_submit(self, grantee: iam.IGrantable) -> None:
        """SubmitJob on this queue and job definition only; TerminateJob (cancel) on jobs."""
        self.job_definition.grant_submit_job(grantee, self.job_queue)
        self.grant_terminate(grantee)

    def grant_terminate(self, grantee: iam.IGrantable) -> None:
        """TerminateJob (cancel a run's job)."""
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
