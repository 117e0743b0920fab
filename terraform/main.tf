# The network: one private bucket that carries packets as short-lived objects, and one IAM identity
# per node that may deliver into every inbox but read only its own. Key layout: docs/DESIGN.md,
# "Mailbox keys".

locals {
  tags = merge({ "hoshino:network" = var.bucket_name }, var.tags)
}

resource "aws_s3_bucket" "mailbox" {
  # checkov's own suppressions, so `checkov -d terraform` is clean as people run it; each says why.
  #checkov:skip=CKV_AWS_18:Access logging writes one log record per request into another bucket; at tunnel request rates (thousands per second per busy node) the logs would cost more than the traffic and would be a copy of who talked to whom. Enable CloudTrail data events for an audit instead, if one is needed.
  #checkov:skip=CKV_AWS_21:Versioning is off on purpose: objects are packets deleted on delivery, and versioning would keep every one as a noncurrent version (see the comment on aws_s3_bucket_versioning.mailbox in main.tf).
  #checkov:skip=CKV_AWS_144:Cross-region replication would copy packets that live milliseconds to another region and pay for it; the bucket holds no data worth keeping.
  #checkov:skip=CKV_AWS_145:SSE-S3 (AES-256) instead of SSE-KMS: KMS adds a request charge per PUT/GET and a key policy per node for objects that are deleted within milliseconds of being written. With a network key, bundles are also encrypted and authenticated end to end (bundle format v2).
  #checkov:skip=CKV2_AWS_62:Event notifications are not needed: receivers find new objects by predictable per-sender keys, a rare LIST and their doorbell object (docs/DESIGN.md), which costs less than an SQS/SNS fan-out per packet.
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
  tags          = local.tags
}

resource "aws_s3_bucket_public_access_block" "mailbox" {
  bucket = aws_s3_bucket.mailbox.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# ACLs off: every object belongs to the bucket owner, whichever node wrote it; access is decided by
# IAM policies alone.
resource "aws_s3_bucket_ownership_controls" "mailbox" {
  bucket = aws_s3_bucket.mailbox.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

# SSE-S3 (AES-256, keys held by S3). SSE-KMS would add a KMS request per PUT and GET (or per
# bucket-key period) and a key policy per node for objects that live a few milliseconds; the
# checkov skip file says the same.
resource "aws_s3_bucket_server_side_encryption_configuration" "mailbox" {
  bucket = aws_s3_bucket.mailbox.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

# Versioning stays off, deliberately: an object is a packet bundle that is deleted once delivered.
# With versioning, every DELETE would keep the bundle as a noncurrent version (storage, and a copy of
# the traffic a reader could recover) and add a delete marker. "Disabled" is only valid for a bucket
# that was never versioned, which this one is; the lifecycle rule below still expires noncurrent
# versions in case someone turns versioning on by hand.
resource "aws_s3_bucket_versioning" "mailbox" {
  bucket = aws_s3_bucket.mailbox.id

  versioning_configuration {
    status = "Disabled"
  }
}

# Garbage collection only: agents delete what they deliver. What is left (a node that was down, a
# PUT whose sender crashed mid-upload) goes after a day, S3's smallest lifecycle unit.
resource "aws_s3_bucket_lifecycle_configuration" "mailbox" {
  bucket = aws_s3_bucket.mailbox.id

  rule {
    id     = "expire-leftovers"
    status = "Enabled"

    filter {}

    expiration {
      days = 1
    }

    noncurrent_version_expiration {
      noncurrent_days = 1
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  depends_on = [aws_s3_bucket_versioning.mailbox]
}

# Plain-HTTP requests and TLS older than 1.2 are refused for everyone, whatever their IAM policy.
data "aws_iam_policy_document" "tls_only" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.mailbox.arn, "${aws_s3_bucket.mailbox.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid       = "DenyOutdatedTls"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.mailbox.arn, "${aws_s3_bucket.mailbox.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }
}

resource "aws_s3_bucket_policy" "tls_only" {
  bucket = aws_s3_bucket.mailbox.id
  policy = data.aws_iam_policy_document.tls_only.json

  # S3 rejects a bucket policy while a public access block is being written.
  depends_on = [aws_s3_bucket_public_access_block.mailbox]
}

module "node" {
  source   = "./modules/node"
  for_each = var.nodes

  name        = each.key
  node_id     = each.value.node_id
  identity    = each.value.identity
  name_prefix = var.name_prefix
  bucket_arn  = aws_s3_bucket.mailbox.arn
  bucket_name = aws_s3_bucket.mailbox.id
  region      = aws_s3_bucket.mailbox.region
  prefix      = var.prefix
  tags        = local.tags
}
