# The export bucket. Key layout (README.md "S3 layout", exporter/layout.py), with the default prefix:
#   jiralake/<table folder>/latest/...          overwritten by every full export
#   jiralake/<table folder>/history/dt=.../...  one per UTC day
#   jiralake/<table folder>/changes/dt=.../...  --changed-since-last
# where <table folder> is ap_jira_task, ap_jira_task_csv_gz or ap_jira_task_parquet.

locals {
  s3_sse_kms = var.s3_kms_key_arn != null

  # One lifecycle rule per table folder and kind of old data that should expire.
  expiring_folders = merge(
    var.history_expiration_days == null ? {} : {
      for folder in var.export_table_folders : "expire-${folder}-history" => {
        prefix = "${local.export_prefix_path}${folder}/history/"
        days   = var.history_expiration_days
      }
    },
    var.changes_expiration_days == null ? {} : {
      for folder in var.export_table_folders : "expire-${folder}-changes" => {
        prefix = "${local.export_prefix_path}${folder}/changes/"
        days   = var.changes_expiration_days
      }
    },
  )
}

resource "aws_s3_bucket" "exports" {
  bucket        = var.bucket_name
  force_destroy = var.bucket_force_destroy
}

# ACLs off: the bucket owner owns every object, including those written by another account's
# exporter, so no object needs (or may send) a bucket-owner-full-control ACL.
resource "aws_s3_bucket_ownership_controls" "exports" {
  bucket = aws_s3_bucket.exports.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "exports" {
  bucket = aws_s3_bucket.exports.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# latest/ is replaced by every full export and a same-day re-run replaces that day's history/ object:
# versioning keeps the previous copies until the noncurrent-version rule below removes them.
resource "aws_s3_bucket_versioning" "exports" {
  bucket = aws_s3_bucket.exports.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "exports" {
  bucket = aws_s3_bucket.exports.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = local.s3_sse_kms ? "aws:kms" : "AES256"
      kms_master_key_id = var.s3_kms_key_arn
    }
    # One KMS request per object instead of one per part: cheaper multipart uploads with SSE-KMS.
    bucket_key_enabled = local.s3_sse_kms
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "exports" {
  bucket = aws_s3_bucket.exports.id
  # Rules on noncurrent versions need versioning to be configured first.
  depends_on = [aws_s3_bucket_versioning.exports]

  # The exporter aborts a failed upload itself, and the next export run aborts the uploads a killed
  # process (SIGKILL, OOM) left (recorded in jiralake_export_upload; docs/exporter.md "Killed
  # exporters"). This rule is the backstop for uploads it cannot name or never reaches.
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_upload_days
    }
  }

  dynamic "rule" {
    for_each = var.noncurrent_version_expiration_days == null ? [] : [var.noncurrent_version_expiration_days]
    content {
      id     = "expire-noncurrent-versions"
      status = "Enabled"

      filter {}

      noncurrent_version_expiration {
        noncurrent_days = rule.value
      }

      # Delete markers left alone once their last noncurrent version expired.
      expiration {
        expired_object_delete_marker = true
      }
    }
  }

  dynamic "rule" {
    for_each = local.expiring_folders
    content {
      id     = rule.key
      status = "Enabled"

      filter {
        prefix = rule.value.prefix
      }

      expiration {
        days = rule.value.days
      }
    }
  }
}

# An exporter running in another account gets, from this bucket's policy, the S3 statements of
# deploy/iam/exporter.json on the same resources (so a change to that file flows through). Its own
# account must also give that role exporter.json, substituted with this bucket's ARN: cross-account
# access needs both sides. Objects it writes belong to this account (BucketOwnerEnforced): ACLs are
# disabled, so it sends no bucket-owner-full-control ACL and none is required.
# (The role test is inside the `for`, not a conditional around it: the statements differ in shape, an
# Action string in one and a list in another, so the `for` is a tuple, and Terraform refuses a
# conditional whose branches are tuples of different lengths once the values are known, at apply.)
locals {
  cross_account_exporter_statements = [
    for statement in jsondecode(local.role_policies["exporter"]).Statement : merge(statement, {
      Sid       = "CrossAccount${statement.Sid}"
      Principal = { AWS = var.exporter_role_arn_cross_account }
    })
    if var.exporter_role_arn_cross_account != null
    && alltrue([for action in flatten([statement.Action]) : startswith(action, "s3:")])
  ]
}

resource "aws_s3_bucket_policy" "exports" {
  bucket = aws_s3_bucket.exports.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat([
      {
        Sid       = "DenyInsecureTransport"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [aws_s3_bucket.exports.arn, "${aws_s3_bucket.exports.arn}/*"]
        Condition = { Bool = { "aws:SecureTransport" = "false" } }
      },
    ], local.cross_account_exporter_statements)
  })
  # Both change who may access the bucket; S3 answers OperationAborted when they run at once.
  depends_on = [aws_s3_bucket_public_access_block.exports]
}
