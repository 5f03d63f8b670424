"""Context values and certificates shared by the infra tests (conftest.py and test modules import them)."""

from __future__ import annotations

import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# The other way to deploy: an existing VPC, a hospital CA bundle, a WAF allowlist, on-demand only, the
# Sectra registration settings. One more synthesis (about 15 s), shared by the tests that need it.
EXISTING_VPC = {
    "vpc_id": "vpc-0a1b2c3d4e5f60718",
    "vpc_subnet_ids": "subnet-0aaaaaaaaaaaaaaa1,subnet-0bbbbbbbbbbbbbbb2",
    "vpc_availability_zones": "eu-west-1a,eu-west-1b",
    "vpc_route_table_ids": "rtb-0ccccccccccccccc1,rtb-0ddddddddddddddd2",
}
VARIANT_CONTEXT: dict[str, Any] = {
    **EXISTING_VPC,
    "spot": "false",
    "waf_allowed_cidrs": "203.0.113.0/24, 198.51.100.7/32, 2001:db8::/32",
    "webhook_body_limit_kb": "16",
    "public_url": "https://slides.hospital.example/ai/",
    "sectra_application_id": "he-tissue-lab",
    "sectra_display_name": "Lab H&E tissue",
    "sectra_context": '{"autoRun": true}',
}


def make_ca_pem(common_name: str = "Hospital Internal CA") -> str:
    """A self-signed CA certificate (PEM), as a hospital's internal CA would be."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()
