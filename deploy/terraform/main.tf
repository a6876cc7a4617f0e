# jiralake's AWS infrastructure: the FIFO queue and its dead-letter queue (sqs.tf), the export bucket
# (s3.tf), one IAM role per process built from deploy/iam/*.json (iam.tf) and CloudWatch alarms on
# the queues (alarms.tf). Usage, every variable and output: README.md.

provider "aws" {
  # null: the region comes from AWS_REGION / AWS_DEFAULT_REGION / the profile, as for the AWS CLI.
  region = var.region

  default_tags {
    tags = merge({ "app" = "jiralake" }, var.tags)
  }
}

locals {
  queue_name = "${var.name}.fifo"
  dlq_name   = "${var.name}-dlq.fifo"

  # JIRALAKE_EXPORT_PREFIX without slashes at either end ("" exports to the bucket's root), and the
  # form the IAM templates and S3 prefixes take: followed by "/", or empty at the root.
  export_prefix      = trim(var.export_prefix, "/")
  export_prefix_path = local.export_prefix == "" ? "" : "${local.export_prefix}/"

  # The region every resource is in, read back from the queue's ARN (arn:aws:sqs:REGION:ACCOUNT:NAME).
  region = split(":", aws_sqs_queue.main.arn)[3]
}
