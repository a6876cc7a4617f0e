# The queues `jiralake setup` would create (shared/provision.py), with the same attributes.
#
# Deduplication: the receiver, backfill, the consumer's dead-lettering and `dlq replay` all set
# MessageDeduplicationId themselves (shared/envelope.py, consumer/deadletter.py, ops/dlq.py), so
# content-based deduplication stays off on both queues. Every deduplication id is sent with the
# MessageGroupId of the same event (the Jira issue id), so deduplicating per message group
# (high-throughput mode) drops exactly the duplicates that per-queue deduplication drops.

locals {
  # SQS's largest message since August 2025; the receiver and backfill size their messages for it
  # (shared/provision.py MAX_MESSAGE_BYTES).
  max_message_size_bytes = 1048576
  # 14 days, SQS's maximum: the DLQ must outlive any outage (shared/provision.py RETENTION_S).
  message_retention_s = 1209600

  sqs_sse_kms = var.sqs_kms_key_arn != null
}

resource "aws_sqs_queue" "dlq" {
  name                        = local.dlq_name
  fifo_queue                  = true
  content_based_deduplication = false
  max_message_size            = local.max_message_size_bytes
  message_retention_seconds   = local.message_retention_s

  sqs_managed_sse_enabled           = local.sqs_sse_kms ? null : true
  kms_master_key_id                 = var.sqs_kms_key_arn
  kms_data_key_reuse_period_seconds = local.sqs_sse_kms ? var.sqs_kms_data_key_reuse_period_s : null
}

resource "aws_sqs_queue" "main" {
  name                        = local.queue_name
  fifo_queue                  = true
  content_based_deduplication = false
  deduplication_scope         = var.high_throughput_fifo ? "messageGroup" : "queue"
  fifo_throughput_limit       = var.high_throughput_fifo ? "perMessageGroupId" : "perQueue"
  max_message_size            = local.max_message_size_bytes
  message_retention_seconds   = local.message_retention_s
  # The consumer asks for JIRALAKE_VISIBILITY_TIMEOUT_S on every receive and renews it while a
  # batch runs; the queue's own value applies to any other receiver.
  visibility_timeout_seconds = var.visibility_timeout_s
  receive_wait_time_seconds  = 20

  sqs_managed_sse_enabled           = local.sqs_sse_kms ? null : true
  kms_master_key_id                 = var.sqs_kms_key_arn
  kms_data_key_reuse_period_seconds = local.sqs_sse_kms ? var.sqs_kms_data_key_reuse_period_s : null

  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dlq.arn
    maxReceiveCount     = var.max_receive_count
  })
}

# Only the main queue may use this queue as its dead-letter queue.
resource "aws_sqs_queue_redrive_allow_policy" "dlq" {
  queue_url = aws_sqs_queue.dlq.id

  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = [aws_sqs_queue.main.arn]
  })
}
