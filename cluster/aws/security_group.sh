#!/usr/bin/env bash
# Create the security group that cluster/aws/cluster.yaml names in SecurityGroupIds:
#   inbound SSH (22/tcp) from ADMIN_CIDR only, and all traffic between members of the group (Ray's own ports).
# Nothing else is reachable from outside: the dashboard (8265) and GCS (6379) are not opened.
#
#   ADMIN_CIDR=203.0.113.7/32 [REGION=us-west-2] [VPC_ID=vpc-...] [NAME=mixer-ray] bash cluster/aws/security_group.sh
set -euo pipefail
: "${ADMIN_CIDR:?set ADMIN_CIDR to the CIDR you SSH from, e.g. your public IP/32}"
case "$ADMIN_CIDR" in
  0.0.0.0/0|::/0) echo "refusing to open SSH to the whole internet (ADMIN_CIDR=$ADMIN_CIDR)" >&2; exit 1 ;;
esac
REGION="${REGION:-us-west-2}"
NAME="${NAME:-mixer-ray}"
VPC_ID="${VPC_ID:-$(aws ec2 describe-vpcs --region "$REGION" --filters Name=isDefault,Values=true \
  --query 'Vpcs[0].VpcId' --output text)}"

SG_ID="$(aws ec2 create-security-group --region "$REGION" --vpc-id "$VPC_ID" --group-name "$NAME" \
  --description "Ray cluster $NAME: SSH from admin CIDR, all traffic within the group" \
  --query GroupId --output text)"
aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG_ID" \
  --protocol tcp --port 22 --cidr "$ADMIN_CIDR" >/dev/null
aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG_ID" \
  --protocol -1 --source-group "$SG_ID" >/dev/null
echo "$SG_ID"
