"""Network: the VPC (new, or an existing one by id), its endpoints and the security groups.

Everything that runs in the VPC sits in private subnets with egress: the api and job_events functions
(they call Sectra servers that may be reachable only from inside the hospital network, and Techcyte),
and the job instances unless ``job_subnets=public``. AWS traffic that is heavy or sensitive stays off the
NAT gateway: S3 and DynamoDB through gateway endpoints (free), the image pull (ECR), log shipping
(CloudWatch Logs) and secrets (Secrets Manager) through interface endpoints reachable only from this
stack's security groups.

An existing VPC is imported from its ids alone (``Vpc.from_vpc_attributes``, no context lookup), so
``make synth`` still needs no AWS credentials.
"""

from __future__ import annotations

import aws_cdk.aws_ec2 as ec2
from constructs import Construct

from infra.config import InfraConfig
from infra.storage import Storage

# The interface endpoints the issue names: image pulls (ECR API and registry), logs, secrets.
INTERFACE_ENDPOINTS: dict[str, ec2.InterfaceVpcEndpointAwsService] = {
    "EcrApi": ec2.InterfaceVpcEndpointAwsService.ECR,
    "EcrDocker": ec2.InterfaceVpcEndpointAwsService.ECR_DOCKER,
    "Logs": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS,
    "SecretsManager": ec2.InterfaceVpcEndpointAwsService.SECRETS_MANAGER,
}


class Network(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, config: InfraConfig, storage: Storage) -> None:
        super().__init__(scope, construct_id)

        self.vpc: ec2.IVpc
        if config.vpc_id:
            subnets = [
                ec2.Subnet.from_subnet_attributes(
                    self,
                    f"Subnet{index}",
                    subnet_id=subnet_id,
                    availability_zone=config.vpc_availability_zones[index],
                    route_table_id=config.vpc_route_table_ids[index] if config.vpc_route_table_ids else None,
                )
                for index, subnet_id in enumerate(config.vpc_subnet_ids)
            ]
            self.vpc = ec2.Vpc.from_vpc_attributes(
                self,
                "Vpc",
                vpc_id=config.vpc_id,
                availability_zones=list(dict.fromkeys(config.vpc_availability_zones)),
            )
            self.private_subnets = ec2.SubnetSelection(subnets=subnets)
            self.job_subnets = self.private_subnets
        else:
            vpc = ec2.Vpc(
                self,
                "Vpc",
                max_azs=config.max_azs,
                nat_gateways=config.nat_gateways,
                subnet_configuration=[
                    ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24),
                    ec2.SubnetConfiguration(
                        name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=20
                    ),
                ],
            )
            # Rejected traffic only: enough to investigate a blocked connection, cheap to keep.
            vpc.add_flow_log(
                "RejectedFlows",
                traffic_type=ec2.FlowLogTrafficType.REJECT,
                destination=ec2.FlowLogDestination.to_cloud_watch_logs(storage.log_group(self, "FlowLogs", config)),
            )
            self.vpc = vpc
            self.private_subnets = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)
            self.job_subnets = (
                ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC)
                if config.job_subnets == "public"
                else self.private_subnets
            )

        # Outbound only: nothing connects to the functions or the job instances.
        self.function_security_group = ec2.SecurityGroup(
            self,
            "FunctionSecurityGroup",
            vpc=self.vpc,
            description="slidebridge Lambda functions: outbound only",
            allow_all_outbound=True,
        )
        self.job_security_group = ec2.SecurityGroup(
            self,
            "JobSecurityGroup",
            vpc=self.vpc,
            description="slidebridge GPU job instances: outbound only",
            allow_all_outbound=True,
        )

        self.endpoints: dict[str, ec2.IVpcEndpoint] = {}
        if config.vpc_endpoints:
            self._add_endpoints(public_jobs=config.job_subnets == "public" and not config.vpc_id)

    def _add_endpoints(self, *, public_jobs: bool) -> None:
        gateway_subnets = [self.private_subnets]
        if public_jobs:
            # Job instances in public subnets reach S3 and DynamoDB through the endpoints too.
            gateway_subnets.append(ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC))
        for name, service in (
            ("S3", ec2.GatewayVpcEndpointAwsService.S3),
            ("DynamoDB", ec2.GatewayVpcEndpointAwsService.DYNAMODB),
        ):
            self.endpoints[name] = ec2.GatewayVpcEndpoint(
                self, name, vpc=self.vpc, service=service, subnets=gateway_subnets
            )

        endpoint_security_group = ec2.SecurityGroup(
            self,
            "EndpointSecurityGroup",
            vpc=self.vpc,
            description="slidebridge interface endpoints: HTTPS from the functions and job instances",
            allow_all_outbound=False,
        )
        for source in (self.function_security_group, self.job_security_group):
            endpoint_security_group.add_ingress_rule(source, ec2.Port.tcp(443), "HTTPS to AWS APIs")
        for name, interface_service in INTERFACE_ENDPOINTS.items():
            self.endpoints[name] = ec2.InterfaceVpcEndpoint(
                self,
                name,
                vpc=self.vpc,
                service=interface_service,
                subnets=self.private_subnets,
                security_groups=[endpoint_security_group],
                # Ingress comes from the two security groups above, not from the whole VPC CIDR.
                open=False,
                private_dns_enabled=True,
            )
