#!/usr/bin/env bash
# The security group for cluster.yaml's nodes, made once before the first `ray up`:
#   - any traffic between the cluster's own nodes (GCS, raylets, object managers, workers, dashboard);
#   - SSH (22) from one CIDR only: the machine that runs `ray up`, `ray dashboard`, `ray attach`.
# Nothing else is open; the dashboard and job API are reached through `ray dashboard`'s SSH tunnel.
#
#   deploy/aws/security-group.sh VPC_ID SSH_CIDR [REGION]      # e.g. vpc-0abc 203.0.113.7/32 us-west-2
#
# Prints the group id: put it in SecurityGroupIds of every node type in cluster.yaml. To change the
# CIDR later: aws ec2 revoke-security-group-ingress / authorize-security-group-ingress on port 22.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: $0 VPC_ID SSH_CIDR [REGION]" >&2
    exit 2
fi
vpc=$1
cidr=$2
region=${3:-us-west-2}

if [[ ! $cidr =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/([0-9]|[12][0-9]|3[0-2])$ ]]; then
    echo "$0: SSH_CIDR must be an IPv4 CIDR such as 203.0.113.7/32, got '$cidr'" >&2
    exit 2
fi
if [[ ${cidr#*/} -lt 8 ]]; then
    echo "$0: refusing to open SSH to $cidr (wider than a /8): give the address range you connect from" >&2
    exit 2
fi

group=$(aws ec2 create-security-group --region "$region" --vpc-id "$vpc" \
    --group-name raytrain-nodes \
    --description "raytrain Ray cluster: traffic between its nodes, SSH from $cidr" \
    --query GroupId --output text)
aws ec2 authorize-security-group-ingress --region "$region" --group-id "$group" \
    --ip-permissions \
    "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$group,Description=between-the-cluster-nodes}]" \
    "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$cidr,Description=ssh-for-ray-up}]" \
    >/dev/null
echo "$group"
