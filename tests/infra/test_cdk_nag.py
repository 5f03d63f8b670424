"""cdk-nag: every AWS Solutions finding is fixed or acknowledged with a reason, and synth enforces it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aws_cdk.aws_s3 as s3
import cfnlint.api
import pytest
from cdk_nag import AwsSolutionsChecks

from infra.stack import create_app

if TYPE_CHECKING:
    from conftest import BuiltApp, Synthesized


def test_no_unacknowledged_aws_solutions_findings(built_app: BuiltApp) -> None:
    report = AwsSolutionsChecks().validate_scope(built_app.stack)
    findings = [
        f"{violation.rule_name} ({violation.severity}) at "
        + ", ".join(str(r.construct_path or r.resource_logical_id) for r in violation.violating_resources)
        for violation in report.violations
    ]
    assert findings == []
    assert report.success


def test_synth_fails_on_an_unacknowledged_finding(make_context: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    app, stack = create_app(make_context(), outdir=str(tmp_path))
    # A bucket without TLS enforcement or access logs, acknowledged nowhere.
    s3.Bucket(stack, "Careless")
    with pytest.raises(Exception, match="AwsSolutions-S10"):
        app.synth()
    report = json.loads((tmp_path / "validation-report.json").read_text())
    failed = {
        (violation["ruleName"], construct["constructPath"])
        for plugin in report["pluginReports"]
        if plugin["pluginName"] == "AwsSolutions"
        for violation in plugin["violations"]
        for construct in violation["violatingConstructs"]
    }
    assert ("AwsSolutions-S10", f"{stack.stack_name}/Careless/Resource") in failed
    assert {path for _, path in failed} == {f"{stack.stack_name}/Careless/Resource"}


def _lint(synth: Synthesized) -> list[str]:
    # cfn-lint knows each resource type's schema and allowed values (Batch, API Gateway, WAF, ...).
    matches = cfnlint.api.lint(json.dumps(synth.template.to_json()), regions=["eu-west-1", "us-east-1"])
    # W3005 (a DependsOn that a reference already implies) comes from CDK's own constructs.
    return [f"{m.rule.id} {m.message} at {'/'.join(map(str, m.path))}" for m in matches if m.rule.id != "W3005"]


def test_template_passes_cfn_lint(synth: Synthesized) -> None:
    assert _lint(synth) == []


def test_variant_template_passes_cfn_lint_and_nag(variant: Synthesized, variant_app: BuiltApp) -> None:
    # The variant's synthesis ran cdk-nag too (it fails on findings); the report confirms it looked.
    report = AwsSolutionsChecks().validate_scope(variant_app.stack)
    assert [violation.rule_name for violation in report.violations] == []
    assert _lint(variant) == []
