"""Batch: the GPU compute environment, the queue and the job definition."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import BuiltApp, Synthesized


def _job_definition(synth: Synthesized) -> dict[str, Any]:
    _, definition = synth.one("AWS::Batch::JobDefinition")
    props: dict[str, Any] = definition["Properties"]
    return props


def _compute_environments(synth: Synthesized) -> dict[str, dict[str, Any]]:
    """Compute environment resources by their construct id (GpuSpot, GpuOnDemand)."""
    return {
        environment.node.id: synth.resources[synth.logical_id(environment)]["Properties"]
        for environment in synth.stack.jobs.compute_environments
    }


def test_spot_gpu_environment_scales_to_zero(synth: Synthesized) -> None:
    assert len(synth.of_type("AWS::Batch::ComputeEnvironment")) == 2
    environment = _compute_environments(synth)["GpuSpot"]
    resources = environment["ComputeResources"]
    assert environment["Type"] == "managed"
    assert resources["Type"] == "SPOT"
    assert resources["AllocationStrategy"] == "SPOT_PRICE_CAPACITY_OPTIMIZED"
    assert sorted(resources["InstanceTypes"]) == ["g4dn", "g5", "g6"]
    assert resources["MinvCpus"] == 0
    assert resources["MaxvCpus"] == 32  # "-c max_vcpus=32" in the test context
    assert resources["Ec2Configuration"] == [{"ImageType": "ECS_AL2023_NVIDIA"}]


def test_on_demand_fallback_environment_scales_to_zero(synth: Synthesized) -> None:
    resources = _compute_environments(synth)["GpuOnDemand"]["ComputeResources"]
    assert resources["Type"] == "EC2"
    assert resources["AllocationStrategy"] == "BEST_FIT_PROGRESSIVE"
    assert sorted(resources["InstanceTypes"]) == ["g4dn", "g5", "g6"]
    assert resources["MinvCpus"] == 0
    assert resources["MaxvCpus"] == 16  # cdk.json's on_demand_max_vcpus
    assert resources["Ec2Configuration"] == [{"ImageType": "ECS_AL2023_NVIDIA"}]


def test_queue_tries_spot_first_and_on_demand_second(synth: Synthesized) -> None:
    _, queue = synth.one("AWS::Batch::JobQueue")
    order = {
        entry["Order"]: entry["ComputeEnvironment"]["Fn::GetAtt"][0]
        for entry in queue["Properties"]["ComputeEnvironmentOrder"]
    }
    environments = {env.node.id: synth.logical_id(env) for env in synth.stack.jobs.compute_environments}
    assert order == {1: environments["GpuSpot"], 2: environments["GpuOnDemand"]}


def test_without_spot_one_on_demand_environment_takes_max_vcpus(variant: Synthesized) -> None:
    (environment,) = _compute_environments(variant).values()
    assert environment["ComputeResources"]["Type"] == "EC2"
    assert environment["ComputeResources"]["MaxvCpus"] == 32
    assert environment["ComputeResources"]["MinvCpus"] == 0


def test_job_instances_run_in_the_private_subnets_without_inbound_access(synth: Synthesized) -> None:
    network = synth.stack.network
    private = sorted(synth.logical_id(subnet) for subnet in network.vpc.private_subnets)
    job_group = {"Fn::GetAtt": [synth.logical_id(network.job_security_group), "GroupId"]}
    for environment in _compute_environments(synth).values():
        resources = environment["ComputeResources"]
        assert sorted(ref["Ref"] for ref in resources["Subnets"]) == private
        assert resources["SecurityGroupIds"] == [job_group]
    group = synth.resources[synth.logical_id(network.job_security_group)]["Properties"]
    assert "SecurityGroupIngress" not in group
    ingress_to_jobs = [
        rule
        for rule in synth.of_type("AWS::EC2::SecurityGroupIngress").values()
        if rule["Properties"]["GroupId"] == job_group
    ]
    assert ingress_to_jobs == []


def test_launch_template_gives_a_large_encrypted_gp3_root_volume(synth: Synthesized) -> None:
    _, template = synth.one("AWS::EC2::LaunchTemplate")
    data = template["Properties"]["LaunchTemplateData"]
    (mapping,) = data["BlockDeviceMappings"]
    assert mapping["DeviceName"] == "/dev/xvda"
    assert mapping["Ebs"]["VolumeType"] == "gp3"
    assert mapping["Ebs"]["VolumeSize"] >= 200
    assert mapping["Ebs"]["Encrypted"] is True
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    # Batch rejects launch-template user data that is not MIME multi-part.
    user_data = str(data["UserData"])
    assert "Content-Type: multipart/mixed" in user_data


def test_compute_environments_use_the_launch_template(synth: Synthesized) -> None:
    template_id, _ = synth.one("AWS::EC2::LaunchTemplate")
    for environment in _compute_environments(synth).values():
        launch_template = environment["ComputeResources"]["LaunchTemplate"]
        assert launch_template["LaunchTemplateId"] == {"Ref": template_id}


def test_queue_cancels_jobs_that_can_never_get_capacity(synth: Synthesized) -> None:
    _, queue = synth.one("AWS::Batch::JobQueue")
    # A job that can never get capacity is cancelled (and closed by job_events), not left waiting.
    reasons = {action["Reason"] for action in queue["Properties"]["JobStateTimeLimitActions"]}
    assert "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY" in reasons


def test_job_definition_resources_command_and_timeout(synth: Synthesized) -> None:
    props = _job_definition(synth)
    container = props["ContainerProperties"]
    requirements = {item["Type"]: item["Value"] for item in container["ResourceRequirements"]}
    assert requirements == {"GPU": "1", "VCPU": "4", "MEMORY": "15360"}
    assert container["Command"] == ["python", "-m", "batch_job", "Ref::run_id"]
    assert "run_id" in props["Parameters"]
    assert props["Timeout"]["AttemptDurationSeconds"] == 4 * 3600
    assert props["PlatformCapabilities"] == ["EC2"]
    # Tile workers share tensors through /dev/shm.
    assert container["LinuxParameters"]["SharedMemorySize"] >= 1024


def test_retry_strategy_retries_75_and_spot_reclaim_and_exits_otherwise(synth: Synthesized) -> None:
    strategy = _job_definition(synth)["RetryStrategy"]
    assert strategy["Attempts"] == 3
    # Order matters: Batch applies the first entry that matches.
    assert strategy["EvaluateOnExit"] == [
        {"Action": "RETRY", "OnExitCode": "75"},
        {"Action": "RETRY", "OnStatusReason": "Host EC2*"},
        {"Action": "EXIT", "OnExitCode": "3"},
        {"Action": "EXIT", "OnExitCode": "*"},
    ]


def test_job_environment_and_secrets(synth: Synthesized) -> None:
    container = _job_definition(synth)["ContainerProperties"]
    storage = synth.stack.storage
    environment = {item["Name"]: item["Value"] for item in container["Environment"]}
    assert environment == {
        "SLIDEBRIDGE_TABLE_NAME": {"Ref": synth.logical_id(storage.table)},
        "SLIDEBRIDGE_BUCKET_NAME": {"Ref": synth.logical_id(storage.bucket)},
        "SLIDEBRIDGE_ARTIFACTS_PREFIX": "artifacts/",
        "SLIDEBRIDGE_DOWNLOAD_HOSTS": "slides.example.org,*.s3.eu-west-1.amazonaws.com",
        "SLIDEBRIDGE_SECTRA_CALLBACK_HOSTS": "pacs.example.org:8443",
        "SLIDEBRIDGE_OUTBOUND_TRUSTED_NETWORKS": "",
        "SLIDEBRIDGE_TECHCYTE_API_URL": "https://api.ci.techcyte.com/api/v3",
        "SLIDEBRIDGE_SCRATCH_DIR": "/scratch",
        "SLIDEBRIDGE_BATCH_MAX_ATTEMPTS": "3",
    }
    # Credentials come from Secrets Manager at container start, never as plain values.
    secret_id = synth.logical_id(storage.techcyte_credentials_secret)
    secrets = {item["Name"]: item["ValueFrom"] for item in container["Secrets"]}
    assert secrets == {
        "SLIDEBRIDGE_TECHCYTE_CLIENT_ID": {"Fn::Join": ["", [{"Ref": secret_id}, ":client_id::"]]},
        "SLIDEBRIDGE_TECHCYTE_CLIENT_SECRET": {"Fn::Join": ["", [{"Ref": secret_id}, ":client_secret::"]]},
    }


def test_job_image_is_a_docker_asset_built_from_the_batch_dockerfile(built_app: BuiltApp, synth: Synthesized) -> None:
    image = str(_job_definition(synth)["ContainerProperties"]["Image"])
    assert "container-assets" in image
    manifest = json.loads((built_app.outdir / f"{synth.stack.artifact_id}.assets.json").read_text())
    (docker_image,) = manifest["dockerImages"].values()
    assert docker_image["source"]["dockerFile"] == "batch_job/Dockerfile"
    assert docker_image["source"]["platform"] == "linux/amd64"
    # .dockerignore keeps the build context to what the Dockerfile copies.
    context = built_app.outdir / docker_image["source"]["directory"]
    assert sorted(path.name for path in context.iterdir()) == [".dockerignore", "batch_job", "slidebridge"]


def test_job_role_reaches_the_table_and_the_artifacts_prefix_only(synth: Synthesized) -> None:
    job_role = synth.stack.jobs.job_role
    policy_id = synth.logical_id(job_role.node.find_child("DefaultPolicy"))
    statements = synth.resources[policy_id]["Properties"]["PolicyDocument"]["Statement"]
    actions = {a for s in statements for a in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])}
    assert {"dynamodb:UpdateItem", "s3:PutObject", "s3:GetObject"} <= actions
    assert not {action for action in actions if action.startswith(("batch:", "secretsmanager:", "iam:"))}
    bucket_arn = {"Fn::GetAtt": [synth.logical_id(synth.stack.storage.bucket), "Arn"]}
    s3_resources = [
        statement["Resource"]
        for statement in statements
        if any(a.startswith("s3:") for a in (statement["Action"] if isinstance(statement["Action"], list) else []))
    ]
    assert s3_resources == [{"Fn::Join": ["", [bucket_arn, "/artifacts/*"]]}]
    table_arn = {"Fn::GetAtt": [synth.logical_id(synth.stack.storage.table), "Arn"]}
    dynamodb = [s["Resource"] for s in statements if "dynamodb:UpdateItem" in s["Action"]]
    assert dynamodb == [[table_arn, {"Fn::Join": ["", [table_arn, "/index/*"]]}]]


def test_only_the_execution_role_reads_the_techcyte_secret_for_the_job(synth: Synthesized) -> None:
    container = _job_definition(synth)["ContainerProperties"]
    execution_role_id = container["ExecutionRoleArn"]["Fn::GetAtt"][0]
    readers = {
        policy_id: policy
        for policy_id, policy in synth.of_type("AWS::IAM::Policy").items()
        if any(
            "secretsmanager:GetSecretValue" in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])
            for s in policy["Properties"]["PolicyDocument"]["Statement"]
        )
    }
    execution_policies = [p for p in readers.values() if {"Ref": execution_role_id} in p["Properties"]["Roles"]]
    (policy,) = execution_policies
    (statement,) = [
        s for s in policy["Properties"]["PolicyDocument"]["Statement"] if "secretsmanager:GetSecretValue" in s["Action"]
    ]
    assert statement["Resource"] == {"Ref": synth.logical_id(synth.stack.storage.techcyte_credentials_secret)}


def test_job_log_group_is_encrypted_with_the_stack_key(synth: Synthesized) -> None:
    log_group = synth.resources[synth.logical_id(synth.stack.jobs.job_log_group)]["Properties"]
    assert log_group["KmsKeyId"] == {"Fn::GetAtt": [synth.logical_id(synth.stack.storage.key), "Arn"]}
    container = _job_definition(synth)["ContainerProperties"]
    assert container["LogConfiguration"]["Options"]["awslogs-group"] == {
        "Ref": synth.logical_id(synth.stack.jobs.job_log_group)
    }


def test_hospital_ca_bundle_reaches_the_job(variant: Synthesized, hospital_ca: Path) -> None:
    container = _job_definition(variant)["ContainerProperties"]
    environment = {item["Name"]: item["Value"] for item in container["Environment"]}
    assert environment["SLIDEBRIDGE_CA_BUNDLE"] == "/etc/slidebridge/ca-bundle.pem"
    (volume,) = container["Volumes"]
    assert volume["Host"] == {"SourcePath": "/etc/slidebridge"}
    (mount,) = container["MountPoints"]
    assert mount == {"ContainerPath": "/etc/slidebridge", "ReadOnly": True, "SourceVolume": volume["Name"]}
    # The instance writes the CA and appends it to its own roots before the ECS agent starts jobs.
    _, template = variant.one("AWS::EC2::LaunchTemplate")
    user_data = json.dumps(template["Properties"]["LaunchTemplateData"]["UserData"])
    first_line = hospital_ca.read_text().splitlines()[1]
    assert first_line in user_data
    assert "cat /etc/pki/tls/certs/ca-bundle.crt /etc/slidebridge/hospital-ca.pem > /etc/slidebridge/ca-bundle.pem" in (
        user_data
    )


def test_no_ca_bundle_by_default(synth: Synthesized) -> None:
    container = _job_definition(synth)["ContainerProperties"]
    assert "Volumes" not in container or container["Volumes"] == []
    assert "SLIDEBRIDGE_CA_BUNDLE" not in {item["Name"] for item in container["Environment"]}
