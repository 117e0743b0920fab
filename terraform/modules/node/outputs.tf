output "node_id" {
  description = "The node's id (16 hex digits), as it appears in its inbox and bell keys."
  value       = var.node_id
}

output "address" {
  description = "The node's tunnel address (the /64 plus its id)."
  value       = local.address
}

output "identity" {
  description = "\"user\" or \"instance\"."
  value       = var.identity
}

output "policy_json" {
  description = "The node's IAM policy as deployed (rendered from policy.json.tftpl)."
  value       = local.policy_json
}

output "policy_arn" {
  description = "ARN of the node's IAM policy."
  value       = aws_iam_policy.node.arn
}

output "user_name" {
  description = "The node's IAM user (identity \"user\"), else null."
  value       = one(aws_iam_user.node[*].name)
}

output "access_key_id" {
  description = "The node's access key id (identity \"user\"), else null. Not secret by itself."
  value       = one(aws_iam_access_key.node[*].id)
}

output "secret_access_key" {
  description = "The node's secret access key (identity \"user\"), else null."
  value       = one(aws_iam_access_key.node[*].secret)
  sensitive   = true
}

output "role_arn" {
  description = "The node's IAM role (identity \"instance\"), else null."
  value       = one(aws_iam_role.node[*].arn)
}

output "instance_profile_name" {
  description = "Instance profile to launch the node's EC2 instance with (identity \"instance\"), else null."
  value       = one(aws_iam_instance_profile.node[*].name)
}

output "agent_config" {
  description = "The network part of /etc/hoshino/agent.toml for this node (no secrets)."
  value       = <<-EOT
    bucket = "${var.bucket_name}"
    region = "${var.region}"
    prefix = "${var.prefix}"
  EOT
}

output "environment_file" {
  description = "Contents of /etc/hoshino/agent.env for this node: bucket, region and, for identity \"user\", the access key. Secret."
  sensitive   = true
  value = join("", [
    "HOSHINO_BUCKET=${var.bucket_name}\n",
    "HOSHINO_REGION=${var.region}\n",
    var.identity == "user" ? "AWS_ACCESS_KEY_ID=${one(aws_iam_access_key.node[*].id)}\nAWS_SECRET_ACCESS_KEY=${one(aws_iam_access_key.node[*].secret)}\n" : "",
  ])
}
