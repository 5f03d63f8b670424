"""Network: a new VPC with private subnets and endpoints, or an existing VPC by id."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import aws_cdk as cdk
from aws_cdk.assertions import Template

from infra.config import InfraConfig
from infra.network import Network
from infra.storage import Storage

if TYPE_CHECKING:
    from conftest import Synthesized

INTERFACE_SERVICES = {"ecr.api", "ecr.dkr", "logs", "secretsmanager"}


def _service(endpoint: dict[str, Any]) -> str:
    name = endpoint["Properties"]["ServiceName"]
    # {"Fn::Join": ["", ["com.amazonaws.", {"Ref": "AWS::Region"}, ".s3"]]}
    return str(name["Fn::Join"][1][-1]).lstrip(".")


def _endpoints(synth: Synthesized) -> dict[str, dict[str, Any]]:
    return {_service(e): e["Properties"] for e in synth.of_type("AWS::EC2::VPCEndpoint").values()}


def test_new_vpc_has_private_subnets_behind_one_nat_and_logs_rejected_flows(synth: Synthesized) -> None:
    _, vpc = synth.one("AWS::EC2::VPC")
    assert vpc["Properties"]["EnableDnsSupport"] is True  # private DNS of the interface endpoints
    subnets = synth.of_type("AWS::EC2::Subnet").values()
    public = [s for s in subnets if s["Properties"]["MapPublicIpOnLaunch"]]
    private = [s for s in subnets if not s["Properties"]["MapPublicIpOnLaunch"]]
    assert (len(public), len(private)) == (2, 2)  # max_azs=2
    assert len(synth.of_type("AWS::EC2::NatGateway")) == 1
    _, flow_log = synth.one("AWS::EC2::FlowLog")
    assert flow_log["Properties"]["TrafficType"] == "REJECT"


def test_endpoints_for_s3_dynamodb_ecr_logs_and_secrets(synth: Synthesized) -> None:
    endpoints = _endpoints(synth)
    assert set(endpoints) == {"s3", "dynamodb", *INTERFACE_SERVICES}
    private = list(synth.stack.network.vpc.private_subnets)
    private_route_tables = [synth.stack.resolve(subnet.route_table.route_table_id) for subnet in private]
    for name in ("s3", "dynamodb"):
        assert endpoints[name]["VpcEndpointType"] == "Gateway"
        assert sorted(map(str, endpoints[name]["RouteTableIds"])) == sorted(map(str, private_route_tables))
    private_subnets = {synth.logical_id(subnet) for subnet in synth.stack.network.vpc.private_subnets}
    for name in INTERFACE_SERVICES:
        props = endpoints[name]
        assert props["VpcEndpointType"] == "Interface"
        assert props["PrivateDnsEnabled"] is True
        assert {ref["Ref"] for ref in props["SubnetIds"]} == private_subnets


def test_interface_endpoints_admit_https_from_the_functions_and_the_jobs_only(synth: Synthesized) -> None:
    network = synth.stack.network
    groups = {
        json.dumps(props["SecurityGroupIds"]) for name, props in _endpoints(synth).items() if name in INTERFACE_SERVICES
    }
    (only,) = groups
    (reference,) = json.loads(only)
    endpoint_group = reference["Fn::GetAtt"][0]
    group = synth.resources[endpoint_group]["Properties"]
    assert "SecurityGroupIngress" not in group  # nothing from a CIDR
    sources = {
        rule["Properties"]["SourceSecurityGroupId"]["Fn::GetAtt"][0]
        for rule in synth.of_type("AWS::EC2::SecurityGroupIngress").values()
        if rule["Properties"]["GroupId"]["Fn::GetAtt"][0] == endpoint_group
        and rule["Properties"]["FromPort"] == 443
        and rule["Properties"]["ToPort"] == 443
    }
    assert sources == {
        synth.logical_id(network.function_security_group),
        synth.logical_id(network.job_security_group),
    }


def test_existing_vpc_is_used_by_id_without_creating_one(variant: Synthesized) -> None:
    assert not variant.of_type("AWS::EC2::VPC")
    assert not variant.of_type("AWS::EC2::NatGateway")
    assert not variant.of_type("AWS::EC2::Subnet")
    assert not variant.of_type("AWS::EC2::FlowLog")  # the VPC's owner decides about its flow logs
    given = ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0bbbbbbbbbbbbbbb2"]
    for function in (variant.stack.api.function, variant.stack.job_events.function):
        config = variant.resources[variant.logical_id(function)]["Properties"]["VpcConfig"]
        assert config["SubnetIds"] == given
    for environment in variant.of_type("AWS::Batch::ComputeEnvironment").values():
        assert environment["Properties"]["ComputeResources"]["Subnets"] == given
    endpoints = _endpoints(variant)
    assert set(endpoints) == {"s3", "dynamodb", *INTERFACE_SERVICES}
    assert endpoints["s3"]["VpcId"] == "vpc-0a1b2c3d4e5f60718"
    assert sorted(endpoints["s3"]["RouteTableIds"]) == ["rtb-0ccccccccccccccc1", "rtb-0ddddddddddddddd2"]
    assert endpoints["secretsmanager"]["SubnetIds"] == given


def _network_template(**context: Any) -> Template:
    """Only Storage and Network, from the given configuration (a fast synthesis)."""
    config = InfraConfig.from_mapping(context)
    stack = cdk.Stack(cdk.App(), "NetworkOnly")
    storage = Storage(stack, "Storage", config=config)
    Network(stack, "Network", config=config, storage=storage)
    return Template.from_stack(stack)


def test_public_job_subnets_keep_s3_traffic_on_the_gateway_endpoint() -> None:
    template = _network_template(job_subnets="public").to_json()
    resources = template["Resources"]
    s3 = next(
        r["Properties"] for r in resources.values() if r["Type"] == "AWS::EC2::VPCEndpoint" and _service(r) == "s3"
    )
    # The two private subnets' route tables and the two public ones'.
    assert len(s3["RouteTableIds"]) == 4


def test_endpoints_can_be_left_to_an_existing_vpc() -> None:
    template = _network_template(
        vpc_id="vpc-0a1b2c3d4e5f60718",
        vpc_subnet_ids="subnet-0aaaaaaaaaaaaaaa1",
        vpc_availability_zones="eu-west-1a",
        vpc_endpoints="false",
    ).to_json()
    types = {r["Type"] for r in template["Resources"].values()}
    assert "AWS::EC2::VPCEndpoint" not in types
    assert "AWS::EC2::VPC" not in types
