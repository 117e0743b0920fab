variable "name" {
  description = "Short name of the node, used in IAM names (1-32 lowercase letters, digits, hyphens)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$", var.name))
    error_message = "name must be 1-32 characters of lowercase letters, digits and hyphens, starting and ending with a letter or digit."
  }
}

variable "node_id" {
  description = "The node's Hoshino id: the first 16 hex digits of its /etc/machine-id, lowercase (`hoshino-agent addr` prints it). The policy lets this id read only v2/inbox/<node_id>/ and write only inbox keys ending in .<node_id>."
  type        = string

  validation {
    condition     = can(regex("^[0-9a-f]{16}$", var.node_id)) && var.node_id != "0000000000000000"
    error_message = "node_id must be exactly 16 lowercase hex digits (the first 16 of /etc/machine-id) and not all zero."
  }
}

variable "identity" {
  description = "\"user\": an IAM user with an access key (hosts outside AWS). \"instance\": an IAM role with an instance profile for EC2 (no long-lived key)."
  type        = string
  default     = "user"

  validation {
    condition     = contains(["user", "instance"], var.identity)
    error_message = "identity must be \"user\" or \"instance\"."
  }
}

variable "name_prefix" {
  description = "Prefix of the IAM names created for this node."
  type        = string
  default     = "hoshino"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9+=,.@_-]{0,23}$", var.name_prefix))
    error_message = "name_prefix must be 1-24 characters valid in IAM names (letters, digits, +=,.@_-), starting with a letter or digit."
  }
}

variable "bucket_arn" {
  description = "ARN of the mailbox bucket."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:s3:::[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_arn))
    error_message = "bucket_arn must be an S3 bucket ARN (arn:<partition>:s3:::<bucket>), without a key part."
  }
}

variable "bucket_name" {
  description = "Name of the mailbox bucket (written into the agent's configuration)."
  type        = string
}

variable "region" {
  description = "Region of the mailbox bucket (written into the agent's configuration)."
  type        = string
}

variable "prefix" {
  description = "The network's IPv6 /64 (the agents' --prefix); only used to print each node's address."
  type        = string
  default     = "fd68:6f73:6869:6e6f::/64"

  validation {
    condition     = can(cidrhost(var.prefix, 0)) && endswith(var.prefix, "/64") && strcontains(var.prefix, ":")
    error_message = "prefix must be an IPv6 /64 such as fd68:6f73:6869:6e6f::/64."
  }
}

variable "path" {
  description = "IAM path of the user or role and policy, so fleet tooling can find Hoshino's identities."
  type        = string
  default     = "/hoshino/"

  validation {
    condition     = can(regex("^/([A-Za-z0-9+=,.@_-]+/)*$", var.path))
    error_message = "path must start and end with / (e.g. /hoshino/)."
  }
}

variable "permissions_boundary" {
  description = "ARN of a permissions boundary to attach to the user or role, where the account requires one."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags added to the node's IAM resources."
  type        = map(string)
  default     = {}
}
