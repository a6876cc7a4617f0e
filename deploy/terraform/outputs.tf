locals {
  # What the jiralake processes read (README.md "Configuration"). The bucket's root is "/" there.
  environment = {
    JIRALAKE_QUEUE_URL            = aws_sqs_queue.main.url
    JIRALAKE_DLQ_URL              = aws_sqs_queue.dlq.url
    JIRALAKE_BUCKET               = aws_s3_bucket.exports.bucket
    JIRALAKE_EXPORT_PREFIX        = local.export_prefix == "" ? "/" : local.export_prefix
    JIRALAKE_VISIBILITY_TIMEOUT_S = tostring(var.visibility_timeout_s)
    JIRALAKE_MAX_RECEIVE_COUNT    = tostring(var.max_receive_count)
    AWS_REGION                    = local.region
  }
}

output "queue_url" {
  description = "URL of the main FIFO queue (JIRALAKE_QUEUE_URL)."
  value       = aws_sqs_queue.main.url
}

output "queue_arn" {
  description = "ARN of the main FIFO queue ($${QueueArn} in deploy/iam/*.json)."
  value       = aws_sqs_queue.main.arn
}

output "dlq_url" {
  description = "URL of the FIFO dead-letter queue (JIRALAKE_DLQ_URL)."
  value       = aws_sqs_queue.dlq.url
}

output "dlq_arn" {
  description = "ARN of the FIFO dead-letter queue ($${DlqArn} in deploy/iam/*.json)."
  value       = aws_sqs_queue.dlq.arn
}

output "bucket_name" {
  description = "Name of the export bucket (JIRALAKE_BUCKET)."
  value       = aws_s3_bucket.exports.bucket
}

output "bucket_arn" {
  description = "ARN of the export bucket ($${BucketArn} in deploy/iam/*.json)."
  value       = aws_s3_bucket.exports.arn
}

output "receiver_role_arn" {
  description = "ARN of the receiver's role (deploy/iam/receiver.json): the ECS task role of `jiralake receiver`."
  value       = aws_iam_role.workload["receiver"].arn
}

output "consumer_role_arn" {
  description = "ARN of the consumer's role (deploy/iam/consumer.json): the ECS task role of `jiralake consumer`."
  value       = aws_iam_role.workload["consumer"].arn
}

output "exporter_role_arn" {
  description = "ARN of the exporter's role (deploy/iam/exporter.json): the ECS task role of `jiralake export`."
  value       = aws_iam_role.workload["exporter"].arn
}

output "backfill_role_arn" {
  description = "ARN of the backfill role (deploy/iam/backfill.json) for `jiralake backfill` and `reconcile`; null when create_backfill_role is false."
  value       = try(aws_iam_role.workload["backfill"].arn, null)
}

output "operator_role_arn" {
  description = "ARN of the on-call role (deploy/iam/operator.json) for `jiralake queue stats` and `jiralake dlq ...`; null when operator_principal_arns is empty."
  value       = try(aws_iam_role.operator["operator"].arn, null)
}

output "alarm_arns" {
  description = "ARNs of the CloudWatch alarms, by kind: queue_depth, queue_oldest_message_age, dlq_depth, dlq_oldest_message_age."
  value = {
    queue_depth              = aws_cloudwatch_metric_alarm.queue_depth.arn
    queue_oldest_message_age = aws_cloudwatch_metric_alarm.queue_oldest_message_age.arn
    dlq_depth                = aws_cloudwatch_metric_alarm.dlq_depth.arn
    dlq_oldest_message_age   = aws_cloudwatch_metric_alarm.dlq_oldest_message_age.arn
  }
}

output "environment" {
  description = "The jiralake environment variables these resources determine: JIRALAKE_QUEUE_URL, JIRALAKE_DLQ_URL, JIRALAKE_BUCKET, JIRALAKE_EXPORT_PREFIX, JIRALAKE_VISIBILITY_TIMEOUT_S, JIRALAKE_MAX_RECEIVE_COUNT, AWS_REGION. Merge into each ECS task definition's environment."
  value       = local.environment
}

output "env_file" {
  description = "The same variables as KEY=value lines, for `terraform output -raw env_file > jiralake.env` (docker --env-file, systemd EnvironmentFile)."
  value       = join("", [for key in sort(keys(local.environment)) : "${key}=${local.environment[key]}\n"])
}
