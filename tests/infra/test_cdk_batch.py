"""Batch: the GPU compute environment, the queue and the job definition."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import BuiltApp, Synthesized


def _job_definition(synth: Synthesized) -> dict[str, Any]:
    _, definition = synth.one("AWS::Batch::JobDefinition")
    props: dict[str, Any] = definition["Properties"]
    return props


def test_compute_environment_is_spot_gpu_and_scales_to_zero(synth: Synthesized) -> None:
    _, environment = synth.one("AWS::Batch::ComputeEnvironment")
    resources = environment["Properties"]["ComputeResources"]
    assert environment["Properties"]["Type"] == "managed"
    assert resources["Type"] == "SPOT"
    assert resources["AllocationStrategy"] == "SPOT_PRICE_CAPACITY_OPTIMIZED"
    assert sorted(resources["InstanceTypes"]) == ["g4dn", "g5", "g6"]
    assert resources["MinvCpus"] == 0
    assert resources["MaxvCpus"] == 32  # "-c max_vcpus=32" in the test context
    assert resources["Ec2Configuration"] == [{"ImageType": "ECS_AL2023_NVIDIA"}]


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


def test_compute_environment_uses_the_launch_template(synth: Synthesized) -> None:
    _, environment = synth.one("AWS::Batch::ComputeEnvironment")
    template_id, _ = synth.one("AWS::EC2::LaunchTemplate")
    launch_template = environment["Properties"]["ComputeResources"]["LaunchTemplate"]
    assert launch_template["LaunchTemplateId"] == {"Ref": template_id}


def test_queue_feeds_the_compute_environment(synth: Synthesized) -> None:
    _, queue = synth.one("AWS::Batch::JobQueue")
    environment_id, _ = synth.one("AWS::Batch::ComputeEnvironment")
    (order,) = queue["Properties"]["ComputeEnvironmentOrder"]
    assert order["ComputeEnvironment"] == {"Fn::GetAtt": [environment_id, "ComputeEnvironmentArn"]}
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


def test_job_role_reads_and_writes_data_but_cannot_touch_batch(synth: Synthesized) -> None:
    job_role = synth.stack.jobs.job_role
    policy_id = synth.logical_id(job_role.node.find_child("DefaultPolicy"))
    statements = synth.resources[policy_id]["Properties"]["PolicyDocument"]["Statement"]
    actions = {a for s in statements for a in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])}
    assert {"dynamodb:UpdateItem", "s3:PutObject", "s3:GetObject*"} <= actions
    assert not {action for action in actions if action.startswith(("batch:", "secretsmanager:", "iam:"))}
