"""The hospital CA bundle (context ``ca_bundle_file``): where the functions and the job find it.

``SLIDEBRIDGE_CA_BUNDLE`` replaces the trust store of every outbound call (slidebridge builds its TLS
context from that file alone), so the file handed to the code holds the public roots *and* the hospital
CAs:

- functions: a Lambda layer with ``/opt/ca/ca-bundle.pem`` = certifi's roots (the same package the
  Lambda bundle ships) + the hospital CAs, assembled at synth;
- job: the launch template's user data writes the hospital CAs on each instance and appends them to
  the instance's system roots (Amazon Linux 2023) in ``/etc/slidebridge/ca-bundle.pem``; the job
  definition mounts ``/etc/slidebridge`` read-only. (User data is limited to 16 KB, too small for a
  whole root bundle: hence the instance's own roots there.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import aws_cdk.aws_lambda as lambda_
import certifi
from constructs import Construct

from infra.bundle import REPO_ROOT

LAMBDA_CA_BUNDLE = "/opt/ca/ca-bundle.pem"
JOB_CA_DIR = "/etc/slidebridge"
JOB_CA_BUNDLE = f"{JOB_CA_DIR}/ca-bundle.pem"
# Amazon Linux 2023's system trust store (the ECS AL2023 NVIDIA AMI).
INSTANCE_SYSTEM_ROOTS = "/etc/pki/tls/certs/ca-bundle.crt"
BUILD_DIR = REPO_ROOT / "build" / "ca-bundle"


def combined_bundle(hospital_pem: str) -> str:
    """Public roots (certifi) followed by the hospital CAs."""
    public = Path(certifi.where()).read_text(encoding="ascii")
    return f"{public.rstrip()}\n\n# slidebridge: hospital CA certificates (ca_bundle_file)\n{hospital_pem}"


def lambda_layer(scope: Construct, construct_id: str, hospital_pem: str) -> lambda_.LayerVersion:
    content = combined_bundle(hospital_pem)
    # A directory per content: the asset hash follows the file, and synths of other bundles do not collide.
    directory = BUILD_DIR / hashlib.sha256(content.encode()).hexdigest()[:16]
    target = directory / "ca" / "ca-bundle.pem"
    if not target.is_file() or target.read_text(encoding="ascii") != content:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="ascii")
    return lambda_.LayerVersion(
        scope,
        construct_id,
        code=lambda_.Code.from_asset(str(directory)),
        description=f"slidebridge: public roots + hospital CAs at {LAMBDA_CA_BUNDLE}",
        compatible_runtimes=[lambda_.Runtime.PYTHON_3_12],
    )


def instance_commands(hospital_pem: str) -> list[str]:
    """User-data shell commands that leave the combined bundle at ``JOB_CA_BUNDLE`` on the instance."""
    return [
        f"mkdir -p {JOB_CA_DIR}",
        f"cat > {JOB_CA_DIR}/hospital-ca.pem <<'SLIDEBRIDGE_CA'",
        *hospital_pem.rstrip("\n").splitlines(),
        "SLIDEBRIDGE_CA",
        f"cat {INSTANCE_SYSTEM_ROOTS} {JOB_CA_DIR}/hospital-ca.pem > {JOB_CA_BUNDLE}",
        f"chmod 0644 {JOB_CA_BUNDLE}",
    ]
