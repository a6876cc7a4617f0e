# One role per jiralake process, each with its policy from deploy/iam/<role>.json: the files are
# templates whose ${QueueArn}, ${DlqArn}, ${BucketArn} and ${ExportPrefix} placeholders templatefile()
# fills in (deploy/iam/README.md). templatefile() fails on a placeholder it has no value for.

locals {
  iam_policy_dir = "${path.module}/../iam"
  iam_policy_vars = {
    QueueArn     = aws_sqs_queue.main.arn
    DlqArn       = aws_sqs_queue.dlq.arn
    BucketArn    = aws_s3_bucket.exports.arn
    ExportPrefix = local.export_prefix_path
  }

  # Roles assumed by the processes themselves (ECS tasks by default); the key names the policy file.
  workload_roles = toset(concat(["receiver", "consumer", "exporter"], var.create_backfill_role ? ["backfill"] : []))
  # The on-call engineer's role (`jiralake queue stats`, `jiralake dlq ...`), assumed by people.
  operator_roles = toset(length(var.operator_principal_arns) > 0 ? ["operator"] : [])

  role_policies = {
    for role in setunion(local.workload_roles, local.operator_roles) :
    role => templatefile("${local.iam_policy_dir}/${role}.json", local.iam_policy_vars)
  }

  # Roles that call SQS (all but the exporter), and so need the queues' KMS key when there is one.
  sqs_roles = setsubtract(setunion(local.workload_roles, local.operator_roles), ["exporter"])

  # EKS Pod Identity also tags the session it assumes.
  workload_trust_actions = contains(var.trusted_service_principals, "pods.eks.amazonaws.com") ? ["sts:AssumeRole", "sts:TagSession"] : ["sts:AssumeRole"]
  workload_trust_policy = coalesce(var.assume_role_policy_json, jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = var.trusted_service_principals }
      Action    = local.workload_trust_actions
    }]
  }))
}

resource "aws_iam_role" "workload" {
  for_each = local.workload_roles

  name                 = "${var.name}-${each.key}"
  description          = "jiralake ${each.key}: deploy/iam/${each.key}.json"
  assume_role_policy   = lookup(var.assume_role_policy_json_by_role, each.key, local.workload_trust_policy)
  permissions_boundary = var.role_permissions_boundary_arn
}

resource "aws_iam_role_policy" "workload" {
  for_each = local.workload_roles

  name   = var.name
  role   = aws_iam_role.workload[each.key].id
  policy = local.role_policies[each.key]
}

resource "aws_iam_role" "operator" {
  for_each = local.operator_roles

  name        = "${var.name}-${each.key}"
  description = "jiralake on-call: deploy/iam/${each.key}.json"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { AWS = var.operator_principal_arns }
      Action    = "sts:AssumeRole"
    }]
  })
  permissions_boundary = var.role_permissions_boundary_arn
}

resource "aws_iam_role_policy" "operator" {
  for_each = local.operator_roles

  name   = var.name
  role   = aws_iam_role.operator[each.key].id
  policy = local.role_policies[each.key]
}

# SSE-KMS with a customer managed key (deploy/iam/README.md): sending needs kms:GenerateDataKey and
# kms:Decrypt on the queues' key, receiving kms:Decrypt; the exporter needs both on the bucket's key
# for multipart uploads and the copy to latest/. The key policies must allow these roles too.
resource "aws_iam_role_policy" "sqs_kms" {
  for_each = var.sqs_kms_key_arn == null ? toset([]) : local.sqs_roles

  name = "${var.name}-sqs-kms"
  role = each.key == "operator" ? aws_iam_role.operator[each.key].id : aws_iam_role.workload[each.key].id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid      = "UseQueueKey"
      Effect   = "Allow"
      Action   = ["kms:GenerateDataKey", "kms:Decrypt"]
      Resource = var.sqs_kms_key_arn
    }]
  })
}

resource "aws_iam_role_policy" "s3_kms" {
  count = var.s3_kms_key_arn == null ? 0 : 1

  name = "${var.name}-s3-kms"
  role = aws_iam_role.workload["exporter"].id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid      = "UseBucketKey"
      Effect   = "Allow"
      Action   = ["kms:GenerateDataKey", "kms:Decrypt"]
      Resource = var.s3_kms_key_arn
    }]
  })
}
