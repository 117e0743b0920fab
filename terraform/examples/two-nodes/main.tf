# A two-node Hoshino network: alpha is a host anywhere (IAM user + access key), beta an EC2
# instance (IAM role + instance profile). README.md beside this file has the commands.

terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 7.0"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  description = "Region of the bucket. Put it where the nodes are: S3 requests within a region cost no transfer fee, and an S3 gateway endpoint makes them free of NAT charges too."
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "Globally unique bucket name, e.g. hoshino-<your-org>-demo."
  type        = string
}

variable "alpha_node_id" {
  description = "First 16 hex digits of alpha's /etc/machine-id (run `hoshino-agent addr` or `head -c 16 /etc/machine-id` on alpha)."
  type        = string
}

variable "beta_node_id" {
  description = "First 16 hex digits of beta's /etc/machine-id."
  type        = string
}

module "hoshino" {
  source = "../.."

  bucket_name   = var.bucket_name
  force_destroy = true
  nodes = {
    alpha = { node_id = var.alpha_node_id, identity = "user" }
    beta  = { node_id = var.beta_node_id, identity = "instance" }
  }
}

output "nodes" {
  description = "Per node: id, tunnel address, identity, and the agent settings."
  value       = module.hoshino.nodes
}

output "node_environment_files" {
  description = "Per node: contents of /etc/hoshino/agent.env."
  value       = module.hoshino.node_environment_files
  sensitive   = true
}
