output "bucket_name" {
  description = "The mailbox bucket (the agents' --bucket)."
  value       = aws_s3_bucket.mailbox.id
}

output "bucket_arn" {
  description = "ARN of the mailbox bucket."
  value       = aws_s3_bucket.mailbox.arn
}

output "bucket_region" {
  description = "Region of the mailbox bucket (the agents' --region)."
  value       = aws_s3_bucket.mailbox.region
}

output "nodes" {
  description = "Per node: id, tunnel address, identity and the non-secret settings of its agent."
  value = {
    for name, node in module.node : name => {
      node_id               = node.node_id
      address               = node.address
      identity              = node.identity
      user_name             = node.user_name
      access_key_id         = node.access_key_id
      role_arn              = node.role_arn
      instance_profile_name = node.instance_profile_name
      agent_config          = node.agent_config
    }
  }
}

output "node_environment_files" {
  description = "Per node: the contents of /etc/hoshino/agent.env (HOSHINO_BUCKET, HOSHINO_REGION and, for identity \"user\", the access key). Secret."
  value       = { for name, node in module.node : name => node.environment_file }
  sensitive   = true
}
