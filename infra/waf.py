"""WAF on the REST API stage: optional source-IP allowlist, a per-IP rate rule, size limits, known bad inputs.

Rules in priority order (the first terminating match decides):

1. ``source-ip-allowlist`` (only with ``waf_allowed_cidrs``): a request from elsewhere is blocked. It covers
   every route: vendors' servers and Platform API clients alike.
2. ``rate-limit``: more than ``waf_rate_limit`` requests in 5 minutes from one IP are blocked.
3. ``size-limits``: a URI path over 2 KB or a query string over 4 KB is blocked anywhere, and a webhook
   body (``/hooks/...``) over ``webhook_body_limit_kb``. Vendor payloads are small; Platform API bodies
   (a run lists one signed URL per item) keep API Gateway's own 10 MB limit. Beyond what WAF inspects,
   a body counts as too large (oversize handling MATCH): WAF is told to inspect exactly the limit.
4. ``known-bad-inputs``: the AWS managed rule group against request patterns of known exploits (e.g.
   Log4j lookups), which no vendor or client sends.
"""

from __future__ import annotations

import aws_cdk.aws_apigateway as apigateway
import aws_cdk.aws_wafv2 as wafv2
from constructs import Construct

from infra.config import InfraConfig

MAX_URI_PATH_BYTES = 2048
MAX_QUERY_STRING_BYTES = 4096
_NO_TRANSFORMATION = [wafv2.CfnWebACL.TextTransformationProperty(priority=0, type="NONE")]


def _visibility(name: str) -> wafv2.CfnWebACL.VisibilityConfigProperty:
    return wafv2.CfnWebACL.VisibilityConfigProperty(
        cloud_watch_metrics_enabled=True, metric_name=name, sampled_requests_enabled=True
    )


def _size_over(field: wafv2.CfnWebACL.FieldToMatchProperty, size: int) -> wafv2.CfnWebACL.StatementProperty:
    return wafv2.CfnWebACL.StatementProperty(
        size_constraint_statement=wafv2.CfnWebACL.SizeConstraintStatementProperty(
            comparison_operator="GT", field_to_match=field, size=size, text_transformations=_NO_TRANSFORMATION
        )
    )


class Waf(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, config: InfraConfig, stage: apigateway.Stage) -> None:
        super().__init__(scope, construct_id)
        prefix = f"slidebridge-{config.stage}"
        block = wafv2.CfnWebACL.RuleActionProperty(block={})
        rules: list[wafv2.CfnWebACL.RuleProperty] = []

        networks = config.waf_allowed_networks
        self.ip_sets: list[wafv2.CfnIPSet] = []
        for version, label in ((4, "IPV4"), (6, "IPV6")):
            addresses = [str(network) for network in networks if network.version == version]
            if addresses:
                self.ip_sets.append(
                    wafv2.CfnIPSet(
                        self,
                        f"Allowed{label.capitalize()}",
                        scope="REGIONAL",
                        ip_address_version=label,
                        addresses=addresses,
                        description=f"{prefix}: source addresses allowed to call the API",
                    )
                )
        if self.ip_sets:
            references = [
                wafv2.CfnWebACL.StatementProperty(
                    ip_set_reference_statement=wafv2.CfnWebACL.IPSetReferenceStatementProperty(arn=ip_set.attr_arn)
                )
                for ip_set in self.ip_sets
            ]
            allowed = (
                references[0]
                if len(references) == 1
                else wafv2.CfnWebACL.StatementProperty(
                    or_statement=wafv2.CfnWebACL.OrStatementProperty(statements=references)
                )
            )
            rules.append(
                wafv2.CfnWebACL.RuleProperty(
                    name="source-ip-allowlist",
                    priority=len(rules),
                    action=block,
                    statement=wafv2.CfnWebACL.StatementProperty(
                        not_statement=wafv2.CfnWebACL.NotStatementProperty(statement=allowed)
                    ),
                    visibility_config=_visibility(f"{prefix}-source-ip-allowlist"),
                )
            )

        rules.append(
            wafv2.CfnWebACL.RuleProperty(
                name="rate-limit",
                priority=len(rules),
                action=block,
                statement=wafv2.CfnWebACL.StatementProperty(
                    rate_based_statement=wafv2.CfnWebACL.RateBasedStatementProperty(
                        aggregate_key_type="IP", limit=config.waf_rate_limit, evaluation_window_sec=300
                    )
                ),
                visibility_config=_visibility(f"{prefix}-rate-limit"),
            )
        )

        webhook_body_too_large = wafv2.CfnWebACL.StatementProperty(
            and_statement=wafv2.CfnWebACL.AndStatementProperty(
                statements=[
                    wafv2.CfnWebACL.StatementProperty(
                        byte_match_statement=wafv2.CfnWebACL.ByteMatchStatementProperty(
                            # Contains, not starts with: the path begins with the stage name on the
                            # execute-api host, and without it behind a custom domain.
                            field_to_match=wafv2.CfnWebACL.FieldToMatchProperty(uri_path={}),
                            positional_constraint="CONTAINS",
                            search_string="/hooks/",
                            text_transformations=_NO_TRANSFORMATION,
                        )
                    ),
                    _size_over(
                        wafv2.CfnWebACL.FieldToMatchProperty(
                            body=wafv2.CfnWebACL.BodyProperty(oversize_handling="MATCH")
                        ),
                        config.webhook_body_limit_kb * 1024,
                    ),
                ]
            )
        )
        rules.append(
            wafv2.CfnWebACL.RuleProperty(
                name="size-limits",
                priority=len(rules),
                action=block,
                statement=wafv2.CfnWebACL.StatementProperty(
                    or_statement=wafv2.CfnWebACL.OrStatementProperty(
                        statements=[
                            _size_over(wafv2.CfnWebACL.FieldToMatchProperty(uri_path={}), MAX_URI_PATH_BYTES),
                            _size_over(wafv2.CfnWebACL.FieldToMatchProperty(query_string={}), MAX_QUERY_STRING_BYTES),
                            webhook_body_too_large,
                        ]
                    )
                ),
                visibility_config=_visibility(f"{prefix}-size-limits"),
            )
        )

        rules.append(
            wafv2.CfnWebACL.RuleProperty(
                name="known-bad-inputs",
                priority=len(rules),
                override_action=wafv2.CfnWebACL.OverrideActionProperty(none={}),
                statement=wafv2.CfnWebACL.StatementProperty(
                    managed_rule_group_statement=wafv2.CfnWebACL.ManagedRuleGroupStatementProperty(
                        vendor_name="AWS", name="AWSManagedRulesKnownBadInputsRuleSet"
                    )
                ),
                visibility_config=_visibility(f"{prefix}-known-bad-inputs"),
            )
        )

        self.web_acl = wafv2.CfnWebACL(
            self,
            "WebAcl",
            name=prefix,
            description=f"{prefix}: in front of the REST API stage",
            scope="REGIONAL",
            default_action=wafv2.CfnWebACL.DefaultActionProperty(allow={}),
            visibility_config=_visibility(prefix),
            rules=rules,
            # API Gateway bodies: WAF inspects 16 KB unless told more (each 16 KB step above costs extra).
            association_config=(
                wafv2.CfnWebACL.AssociationConfigProperty(
                    request_body={
                        "API_GATEWAY": wafv2.CfnWebACL.RequestBodyAssociatedResourceTypeConfigProperty(
                            default_size_inspection_limit=f"KB_{config.webhook_body_limit_kb}"
                        )
                    }
                )
                if config.webhook_body_limit_kb > 16
                else None
            ),
        )
        # The stage ARN refers to the stage, so CloudFormation creates the stage first.
        self.association = wafv2.CfnWebACLAssociation(
            self, "Association", resource_arn=stage.stage_arn, web_acl_arn=self.web_acl.attr_arn
        )
