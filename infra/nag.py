"""cdk-nag (v3) wiring: the AWS Solutions pack as a CDK validation plugin, and acknowledgments.

cdk-nag v3 reports through CDK's policy validation: an unacknowledged finding interrupts synthesis.
Each finding is acknowledged on its own, by rule id and, for rules with several findings per resource
(IAM5 wildcards), by ``RULE[finding]``; an acknowledgment covers the construct and its children.
"""

from __future__ import annotations

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks
from constructs import IConstruct


def apply_checks(app: cdk.App) -> AwsSolutionsChecks:
    checks = AwsSolutionsChecks(app, verbose=True)
    cdk.Validations.of(app).add_plugins(checks)
    return checks


def acknowledge(scope: IConstruct, rule_id: str, reason: str) -> None:
    cdk.Validations.of(scope).acknowledge(cdk.Acknowledgment(id=rule_id, reason=reason))
