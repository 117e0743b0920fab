# One node's identity and its least-privilege policy. The policy text lives in policy.json.tftpl,
# the single source that Terraform deploys and the test suite checks against an IAM-enforcing S3.

locals {
  policy_json = templatefile("${path.module}/policy.json.tftpl", {
    bucket_arn = var.bucket_arn
    node_id    = var.node_id
  })

  iam_name = "${var.name_prefix}-node-${var.name}"

  # The interface identifier is the node id; cidrhost takes it as a 64-bit host number and prints
  # the canonical IPv6 form (the agent's `addr` command prints the same).
  address = cidrhost(var.prefix, parseint(var.node_id, 16))

  tags = merge(var.tags, { "hoshino:node-id" = var.node_id })
}

resource "aws_iam_policy" "node" {
  name        = local.iam_name
  path        = var.path
  description = "Hoshino node ${var.name} (${var.node_id}): deliver into any inbox as itself, receive only from its own"
  policy      = local.policy_json
  tags        = local.tags
}

# identity = "user": for hosts outside AWS. The key is the only secret; it reaches the host as the
# environment file this module outputs.
resource "aws_iam_user" "node" {
  count = var.identity == "user" ? 1 : 0

  name                 = local.iam_name
  path                 = var.path
  permissions_boundary = var.permissions_boundary
  tags                 = local.tags
}

resource "aws_iam_user_policy_attachment" "node" {
  count = var.identity == "user" ? 1 : 0

  user       = aws_iam_user.node[0].name
  policy_arn = aws_iam_policy.node.arn
}

resource "aws_iam_access_key" "node" {
  count = var.identity == "user" ? 1 : 0

  user = aws_iam_user.node[0].name
}

# identity = "instance": an EC2 instance gets the role through its instance profile and the SDK's
# default chain picks the credentials up from the metadata service; nothing secret leaves AWS.
data "aws_iam_policy_document" "assume_from_ec2" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  count = var.identity == "instance" ? 1 : 0

  name                 = local.iam_name
  path                 = var.path
  assume_role_policy   = data.aws_iam_policy_document.assume_from_ec2.json
  permissions_boundary = var.permissions_boundary
  tags                 = local.tags
}

resource "aws_iam_role_policy_attachment" "node" {
  count = var.identity == "instance" ? 1 : 0

  role       = aws_iam_role.node[0].name
  policy_arn = aws_iam_policy.node.arn
}

resource "aws_iam_instance_profile" "node" {
  count = var.identity == "instance" ? 1 : 0

  name = local.iam_name
  path = var.path
  role = aws_iam_role.node[0].name
  tags = local.tags
}
