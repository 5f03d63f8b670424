"""Synthesise the CDK app once per session and share the template.

The app is built from the repository's cdk.json context (feature flags and defaults) plus a few test
values, against a source-only Lambda bundle in a temporary directory: no pip, no network, no Docker,
no AWS credentials. ``make synth`` is what builds and checks the real bundle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.infra.support import VARIANT_CONTEXT, make_ca_pem

if TYPE_CHECKING:
    import aws_cdk as cdk
    from aws_cdk.assertions import Template

    from infra.stack import SlidebridgeStack

REPO_ROOT = Path(__file__).resolve().parents[2]

# Values that differ from the defaults, so that the tests can see configuration reach the template.
TEST_CONTEXT: dict[str, Any] = {
    "stage": "test",
    "max_vcpus": "32",  # a string, as `cdk synth -c max_vcpus=32` passes it
    "slides_retention_days": 5,
    "download_hosts": "slides.example.org, *.s3.eu-west-1.amazonaws.com",
    "sectra_callback_hosts": "pacs.example.org:8443",
    "techcyte_api_url": "https://api.ci.techcyte.com/api/v3",
    "alarm_email": "ops@example.org",
    "api_throttle_rate": 20,
    "api_throttle_burst": 40,
}


def pytest_configure(config: pytest.Config) -> None:
    # aws-cdk-lib's jsii runtime prints a large banner on Node versions it no longer supports. It reads
    # these when its Node process starts, at the first aws_cdk import: so this conftest imports aws_cdk
    # and infra only inside fixtures (test modules are imported after this hook has run).
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "18,20")
    os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")


def cdk_json_context() -> dict[str, Any]:
    context = json.loads((REPO_ROOT / "cdk.json").read_text())["context"]
    assert isinstance(context, dict)
    return context


@pytest.fixture(scope="session")
def stub_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from infra.bundle import build_bundle  # noqa: PLC0415 - see pytest_configure

    target = tmp_path_factory.mktemp("lambda-bundle") / "lambda"
    build_bundle(REPO_ROOT, target, stub=True)
    return target


def app_context(stub_bundle: Path, **overrides: Any) -> dict[str, Any]:
    return {
        **cdk_json_context(),
        **TEST_CONTEXT,
        "lambda_asset_dir": str(stub_bundle),
        "allow_stub_lambda_bundle": True,
        **overrides,
    }


@pytest.fixture(scope="session")
def make_context(stub_bundle: Path) -> Callable[..., dict[str, Any]]:
    """``make_context(key=value, ...)``: the test app's CDK context with overrides."""

    def make(**overrides: Any) -> dict[str, Any]:
        return app_context(stub_bundle, **overrides)

    return make


@dataclass(frozen=True)
class BuiltApp:
    app: cdk.App
    stack: SlidebridgeStack
    outdir: Path


@dataclass(frozen=True)
class Synthesized:
    stack: SlidebridgeStack
    template: Template
    resources: dict[str, dict[str, Any]]

    def of_type(self, cfn_type: str) -> dict[str, dict[str, Any]]:
        return {name: res for name, res in self.resources.items() if res["Type"] == cfn_type}

    def one(self, cfn_type: str) -> tuple[str, dict[str, Any]]:
        found = self.of_type(cfn_type)
        assert len(found) == 1, f"expected one {cfn_type}, found {sorted(found)}"
        return next(iter(found.items()))

    def logical_id(self, construct: Any) -> str:
        """The logical id of an L2 construct's CloudFormation resource."""
        return str(self.stack.resolve(construct.node.default_child.logical_id))


@pytest.fixture(scope="session")
def built_app(stub_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> BuiltApp:
    from infra.stack import create_app  # noqa: PLC0415 - see pytest_configure

    outdir = tmp_path_factory.mktemp("cdk.out")
    app, stack = create_app(app_context(stub_bundle), outdir=str(outdir))
    return BuiltApp(app=app, stack=stack, outdir=outdir)


def synthesize(built: BuiltApp) -> Synthesized:
    from aws_cdk.assertions import Template  # noqa: PLC0415 - see pytest_configure

    # A real synthesis: it runs the validation plugins (cdk-nag) and fails on unacknowledged findings.
    assembly = built.app.synth()
    template_json = assembly.get_stack_artifact(built.stack.artifact_id).template
    return Synthesized(
        stack=built.stack,
        template=Template.from_json(template_json),
        resources=template_json["Resources"],
    )


@pytest.fixture(scope="session")
def synth(built_app: BuiltApp) -> Iterator[Synthesized]:
    yield synthesize(built_app)


@pytest.fixture(scope="session")
def hospital_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "hospital-ca.pem"
    path.write_text(make_ca_pem())
    return path


@pytest.fixture(scope="session")
def variant_app(stub_bundle: Path, hospital_ca: Path, tmp_path_factory: pytest.TempPathFactory) -> BuiltApp:
    from infra.stack import create_app  # noqa: PLC0415 - see pytest_configure

    outdir = tmp_path_factory.mktemp("cdk.out-variant")
    context = app_context(stub_bundle, **VARIANT_CONTEXT, ca_bundle_file=str(hospital_ca))
    app, stack = create_app(context, outdir=str(outdir))
    return BuiltApp(app=app, stack=stack, outdir=outdir)


@pytest.fixture(scope="session")
def variant(variant_app: BuiltApp) -> Synthesized:
    return synthesize(variant_app)
