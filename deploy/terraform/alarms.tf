# CloudWatch alarms on the queues, the counterparts of deploy/prometheus/alerts.yml that need no
# Prometheus: the same thresholds and durations by default. CloudWatch is also the only place the
# main queue's oldest message age is known (jiralake never peeks the main queue: a receive there
# counts toward maxReceiveCount; docs/operations.md "Queue depth").

locals {
  alarm_period_s = 300
}

# JiralakeQueueBacklog: more than 1000 events waiting for 15 minutes.
resource "aws_cloudwatch_metric_alarm" "queue_depth" {
  alarm_name          = "${var.name}-queue-depth"
  alarm_description   = "Events waiting on ${local.queue_name}: the consumer is not keeping up (docs/operations.md#jiralakequeuebacklog)."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.main.name }
  statistic           = "Maximum"
  period              = local.alarm_period_s
  evaluation_periods  = var.queue_depth_alarm_minutes * 60 / local.alarm_period_s
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.queue_depth_alarm_threshold
  # SQS stops sending metrics for a queue that has been idle for hours: an idle queue is healthy.
  treat_missing_data = "notBreaching"
  alarm_actions      = var.alarm_sns_topic_arns
  ok_actions         = var.alarm_sns_topic_arns
}

# JiralakeQueueNotDraining, as CloudWatch sees it: the oldest event has waited too long.
resource "aws_cloudwatch_metric_alarm" "queue_oldest_message_age" {
  alarm_name          = "${var.name}-queue-oldest-message-age"
  alarm_description   = "The oldest event on ${local.queue_name} has waited too long: no consumer handles events (docs/operations.md#jiralakequeuenotdraining)."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateAgeOfOldestMessage"
  dimensions          = { QueueName = aws_sqs_queue.main.name }
  statistic           = "Maximum"
  period              = local.alarm_period_s
  evaluation_periods  = var.queue_oldest_message_age_alarm_minutes * 60 / local.alarm_period_s
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.queue_oldest_message_age_alarm_threshold_s
  treat_missing_data  = "notBreaching"
  alarm_actions       = var.alarm_sns_topic_arns
  ok_actions          = var.alarm_sns_topic_arns
}

# JiralakeDeadLetterQueueNotEmpty: any event in the dead-letter queue for 5 minutes.
resource "aws_cloudwatch_metric_alarm" "dlq_depth" {
  alarm_name          = "${var.name}-dlq-depth"
  alarm_description   = "Events in ${local.dlq_name}: replay or purge them (docs/operations.md#jiralakedeadletterqueuenotempty)."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.dlq.name }
  statistic           = "Maximum"
  period              = local.alarm_period_s
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.dlq_depth_alarm_threshold
  treat_missing_data  = "notBreaching"
  alarm_actions       = var.alarm_sns_topic_arns
  ok_actions          = var.alarm_sns_topic_arns
}

# JiralakeDeadLetterMessageOld: a dead-lettered event is half-way to SQS's 14-day retention.
resource "aws_cloudwatch_metric_alarm" "dlq_oldest_message_age" {
  alarm_name          = "${var.name}-dlq-oldest-message-age"
  alarm_description   = "A dead-lettered event in ${local.dlq_name} is old; SQS deletes it at 14 days (docs/operations.md#jiralakedeadlettermessageold)."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateAgeOfOldestMessage"
  dimensions          = { QueueName = aws_sqs_queue.dlq.name }
  statistic           = "Maximum"
  period              = local.alarm_period_s
  evaluation_periods  = 2
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.dlq_oldest_message_age_alarm_threshold_s
  treat_missing_data  = "notBreaching"
  alarm_actions       = var.alarm_sns_topic_arns
  ok_actions          = var.alarm_sns_topic_arns
}
