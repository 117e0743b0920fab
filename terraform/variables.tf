variable "bucket_name" {
  description = <<-EOT
    Name of the S3 bucket that carries the network's packets. Bucket names are global, so pick one
    nobody else has. S3's general-purpose bucket naming rules, narrowed: 3 to 63 characters of
    lowercase letters, digits and hyphens, starting and ending with a letter or digit, not starting
    with "xn--", "sthree-" or "amzn-s3-demo-", not ending with "-s3alias", "--ol-s3" or "--x-s3".
    Dots, which S3 allows, are rejected: TLS certificates for virtual-hosted requests do not cover
    dotted names (and without dots a name can't look like an IP address).
  EOT
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-63 characters of lowercase letters, digits and hyphens, starting and ending with a letter or digit (dots are not allowed: they break TLS for virtual-hosted requests)."
  }

  validation {
    condition = !(
      startswith(var.bucket_name, "xn--") ||
      startswith(var.bucket_name, "sthree-") ||
      startswith(var.bucket_name, "amzn-s3-demo-") ||
      endswith(var.bucket_name, "-s3alias") ||
      endswith(var.bucket_name, "--ol-s3") ||
      endswith(var.bucket_name, "--x-s3")
    )
    error_message = "bucket_name uses a prefix or suffix S3 reserves (xn--, sthree-, amzn-s3-demo-, -s3alias, --ol-s3, --x-s3)."
  }
}

variable "nodes" {
  description = <<-EOT
    The nodes of the network, keyed by a short node name (used in IAM names, 1-32 characters of
    lowercase letters, digits and hyphens). For each node:
    - node_id:  the node's Hoshino id, the first 16 hex digits of its /etc/machine-id, lowercase
                (`hoshino-agent addr` prints it; `head -c 16 /etc/machine-id` too). The policy
                is scoped to this id, so it must match the machine the credentials go to.
    - identity: "user" (default) creates an IAM user with an access key, for hosts outside AWS or
                in another account; "instance" creates an IAM role and instance profile for an
                EC2 instance, so no long-lived key exists.
  EOT
  type = map(object({
    node_id  = string
    identity = optional(string, "user")
  }))

  validation {
    condition     = length(var.nodes) > 0
    error_message = "nodes must name at least one node."
  }

  validation {
    condition     = alltrue([for name in keys(var.nodes) : can(regex("^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$", name))])
    error_message = "Each node name must be 1-32 characters of lowercase letters, digits and hyphens, starting and ending with a letter or digit."
  }

  validation {
    condition     = alltrue([for n in values(var.nodes) : can(regex("^[0-9a-f]{16}$", n.node_id)) && n.node_id != "0000000000000000"])
    error_message = "Each node_id must be exactly 16 lowercase hex digits (the first 16 of /etc/machine-id) and not all zero."
  }

  validation {
    condition     = length(distinct([for n in values(var.nodes) : n.node_id])) == length(var.nodes)
    error_message = "Two nodes share a node_id: every node needs its own machine-id (clone images with `systemd-machine-id-setup` run on first boot)."
  }

  validation {
    condition     = alltrue([for n in values(var.nodes) : contains(["user", "instance"], n.identity)])
    error_message = "Each node's identity must be \"user\" (IAM user + access key) or \"instance\" (IAM role + instance profile)."
  }
}

variable "name_prefix" {
  description = "Prefix of every IAM name this configuration creates (users, roles, policies), so several networks can share one account."
  type        = string
  default     = "hoshino"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9+=,.@_-]{0,23}$", var.name_prefix))
    error_message = "name_prefix must be 1-24 characters valid in IAM names (letters, digits, +=,.@_-), starting with a letter or digit."
  }
}

variable "force_destroy" {
  description = "Allow `terraform destroy` to delete the bucket while it still holds objects. Objects in it are packets in flight, so this is safe to enable once no agent runs."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags added to every resource that takes tags."
  type        = map(string)
  default     = {}
}

variable "prefix" {
  description = "The network's IPv6 /64, the agents' --prefix (the same on every node). Only used to print each node's address and its agent settings; the default is fd68:6f73:6869:6e6f::/64, the bytes of \"hoshino\"."
  type        = string
  default     = "fd68:6f73:6869:6e6f::/64"

  validation {
    condition     = can(cidrhost(var.prefix, 0)) && endswith(var.prefix, "/64") && strcontains(var.prefix, ":")
    error_message = "prefix must be an IPv6 /64 such as fd68:6f73:6869:6e6f::/64."
  }
}
