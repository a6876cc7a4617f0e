# -- general --

variable "region" {
  description = "AWS region for every resource. null: the provider reads AWS_REGION / AWS_DEFAULT_REGION or the profile."
  type        = string
  default     = null
}

variable "name" {
  description = "Name of the queue (`<name>.fifo`), its DLQ (`<name>-dlq.fifo`), the roles (`<name>-receiver`, ...) and the alarms."
  type        = string
  default     = "jiralake"

  validation {
    # An IAM role name is at most 64 characters, and "-receiver" (or "-consumer", "-exporter",
    # "-backfill", "-operator") takes 9 of them; a queue name's 80 leave more room.
    condition     = can(regex("^[A-Za-z0-9_-]{1,55}$", var.name))
    error_message = "name must be 1-55 letters, digits, '-' or '_' (it becomes SQS queue and IAM role names such as <name>-receiver)."
  }
}

variable "tags" {
  description = "Tags added to every resource (through the provider's default_tags), after app = jiralake."
  type        = map(string)
  default     = {}
}

# -- SQS --

variable "max_receive_count" {
  description = "Receives before SQS moves a message to the DLQ by itself (the redrive policy's maxReceiveCount; JIRALAKE_MAX_RECEIVE_COUNT of `jiralake setup`)."
  type        = number
  default     = 5

  validation {
    condition     = var.max_receive_count >= 1 && var.max_receive_count <= 1000 && floor(var.max_receive_count) == var.max_receive_count
    error_message = "max_receive_count must be a whole number from 1 to 1000."
  }
}

variable "visibility_timeout_s" {
  description = "The main queue's visibility timeout in seconds. Keep it equal to the consumer's JIRALAKE_VISIBILITY_TIMEOUT_S (default 60)."
  type        = number
  default     = 60

  validation {
    condition     = var.visibility_timeout_s >= 1 && var.visibility_timeout_s <= 43200
    error_message = "visibility_timeout_s must be between 1 and 43200 seconds (SQS's limit, and the consumer's)."
  }
}

variable "high_throughput_fifo" {
  description = "FIFO high-throughput mode on the main queue: deduplication per message group and throughput quota per message group id instead of per queue."
  type        = bool
  default     = false
}

variable "sqs_kms_key_arn" {
  description = "ARN of a customer managed KMS key for both queues (SSE-KMS). null: SQS-managed encryption (SSE-SQS). With a key, the roles get kms:GenerateDataKey and kms:Decrypt on it; its key policy must allow them."
  type        = string
  default     = null

  validation {
    condition     = var.sqs_kms_key_arn == null || can(regex("^arn:[^:]+:kms:", var.sqs_kms_key_arn))
    error_message = "sqs_kms_key_arn must be a KMS key ARN (arn:aws:kms:...), so the roles can be granted on it."
  }
}

variable "sqs_kms_data_key_reuse_period_s" {
  description = "With sqs_kms_key_arn: how long SQS reuses a data key before calling KMS again, in seconds (60-86400)."
  type        = number
  default     = 300

  validation {
    condition     = var.sqs_kms_data_key_reuse_period_s >= 60 && var.sqs_kms_data_key_reuse_period_s <= 86400
    error_message = "sqs_kms_data_key_reuse_period_s must be between 60 and 86400 seconds."
  }
}

# -- S3 --

variable "bucket_name" {
  description = "Name of the export bucket to create (JIRALAKE_BUCKET). Bucket names are global: include something unique, such as your account or company."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-63 lowercase letters, digits, '.' or '-', starting and ending with a letter or digit."
  }
}

variable "bucket_force_destroy" {
  description = "Let `terraform destroy` delete the bucket with every export and version in it. Leave false outside test accounts."
  type        = bool
  default     = false
}

variable "s3_kms_key_arn" {
  description = "ARN of a customer managed KMS key for the bucket's default encryption (SSE-KMS, with an S3 Bucket Key). null: SSE-S3. With a key, the exporter's role gets kms:GenerateDataKey and kms:Decrypt on it."
  type        = string
  default     = null

  validation {
    condition     = var.s3_kms_key_arn == null || can(regex("^arn:[^:]+:kms:", var.s3_kms_key_arn))
    error_message = "s3_kms_key_arn must be a KMS key ARN (arn:aws:kms:...)."
  }
}

variable "export_prefix" {
  description = "Key prefix of the exports in the bucket (JIRALAKE_EXPORT_PREFIX). \"\" or \"/\" exports to the bucket's root. Scopes the exporter's role, the cross-account grant and the expiry rules."
  type        = string
  default     = "jiralake"
}

variable "abort_incomplete_multipart_upload_days" {
  description = "Days after which S3 removes the parts of a multipart upload that was neither completed nor aborted (an exporter killed mid-upload)."
  type        = number
  default     = 1

  validation {
    condition     = var.abort_incomplete_multipart_upload_days >= 1
    error_message = "abort_incomplete_multipart_upload_days must be at least 1."
  }
}

variable "noncurrent_version_expiration_days" {
  description = "Days S3 keeps a replaced or deleted object version (every full export replaces latest/). null keeps old versions forever."
  type        = number
  default     = 30

  validation {
    condition     = coalesce(var.noncurrent_version_expiration_days, 1) >= 1
    error_message = "noncurrent_version_expiration_days must be null or at least 1."
  }
}

variable "history_expiration_days" {
  description = "Days after which the daily snapshots under <prefix>/<table folder>/history/ expire. null keeps them forever. The bucket is versioned: an expired object stays as a noncurrent version for noncurrent_version_expiration_days more. The Athena DDL projects dt over the last 3 years."
  type        = number
  default     = null

  validation {
    condition     = coalesce(var.history_expiration_days, 1) >= 1
    error_message = "history_expiration_days must be null or at least 1."
  }
}

variable "changes_expiration_days" {
  description = "Days after which the incremental exports under <prefix>/<table folder>/changes/ expire. null keeps them forever."
  type        = number
  default     = null

  validation {
    condition     = coalesce(var.changes_expiration_days, 1) >= 1
    error_message = "changes_expiration_days must be null or at least 1."
  }
}

variable "export_table_folders" {
  description = "Table folders under the prefix that the history/ and changes/ expiry rules cover: one per export format (exporter/layout.py)."
  type        = list(string)
  default     = ["ap_jira_task", "ap_jira_task_csv_gz", "ap_jira_task_parquet"]
}

variable "exporter_role_arn_cross_account" {
  description = "ARN of an exporter role in another account allowed, by the bucket policy, what deploy/iam/exporter.json allows on <prefix>/*. null: no cross-account access."
  type        = string
  default     = null

  validation {
    condition     = var.exporter_role_arn_cross_account == null || can(regex("^arn:[^:]+:iam::[0-9]{12}:role/", var.exporter_role_arn_cross_account))
    error_message = "exporter_role_arn_cross_account must be an IAM role ARN (arn:aws:iam::123456789012:role/...)."
  }
}

# -- IAM --

variable "trusted_service_principals" {
  description = "Service principals that may assume the receiver, consumer, exporter and backfill roles: ecs-tasks.amazonaws.com (ECS), ec2.amazonaws.com (an instance profile), pods.eks.amazonaws.com (EKS Pod Identity)."
  type        = list(string)
  default     = ["ecs-tasks.amazonaws.com"]

  validation {
    condition     = length(var.trusted_service_principals) > 0
    error_message = "trusted_service_principals needs at least one principal (or set assume_role_policy_json)."
  }
}

variable "assume_role_policy_json" {
  description = "A whole trust policy (JSON) for the receiver, consumer, exporter and backfill roles, replacing the one built from trusted_service_principals: for EKS IRSA (a Federated OIDC principal with conditions) or anything else."
  type        = string
  default     = null
}

variable "assume_role_policy_json_by_role" {
  description = "Trust policies (JSON) per role, keyed receiver, consumer, exporter or backfill, each replacing the shared one for that role: for EKS IRSA, so each role trusts only its own service account (system:serviceaccount:NAMESPACE:NAME), not all four."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for role in keys(var.assume_role_policy_json_by_role) : contains(["receiver", "consumer", "exporter", "backfill"], role)])
    error_message = "assume_role_policy_json_by_role keys must be receiver, consumer, exporter or backfill."
  }
}

variable "role_permissions_boundary_arn" {
  description = "ARN of a managed policy set as every role's permissions boundary. null: none."
  type        = string
  default     = null
}

variable "create_backfill_role" {
  description = "Create the role for `jiralake backfill` and `jiralake reconcile` (deploy/iam/backfill.json), trusted like the service roles."
  type        = bool
  default     = true
}

variable "operator_principal_arns" {
  description = "IAM principals (users, roles, account roots) that may assume the on-call role for `jiralake queue stats` and `jiralake dlq list|replay|purge` (deploy/iam/operator.json). Empty: no operator role."
  type        = list(string)
  default     = []
}

# -- alarms --

variable "alarm_sns_topic_arns" {
  description = "SNS topic ARNs notified when an alarm fires and when it recovers. Empty: the alarms only change state."
  type        = list(string)
  default     = []
}

variable "queue_depth_alarm_threshold" {
  description = "Alarm when more than this many events are visible on the main queue ... (JiralakeQueueBacklog)."
  type        = number
  default     = 1000
}

variable "queue_depth_alarm_minutes" {
  description = "... for this many minutes (a multiple of 5)."
  type        = number
  default     = 15

  validation {
    condition     = var.queue_depth_alarm_minutes >= 5 && var.queue_depth_alarm_minutes % 5 == 0
    error_message = "queue_depth_alarm_minutes must be a multiple of 5 (the alarms' period is 5 minutes)."
  }
}

variable "queue_oldest_message_age_alarm_threshold_s" {
  description = "Alarm when the oldest event on the main queue is older than this many seconds ... (what JiralakeQueueNotDraining sees)."
  type        = number
  default     = 1800
}

variable "queue_oldest_message_age_alarm_minutes" {
  description = "... for this many minutes (a multiple of 5)."
  type        = number
  default     = 15

  validation {
    condition     = var.queue_oldest_message_age_alarm_minutes >= 5 && var.queue_oldest_message_age_alarm_minutes % 5 == 0
    error_message = "queue_oldest_message_age_alarm_minutes must be a multiple of 5 (the alarms' period is 5 minutes)."
  }
}

variable "dlq_depth_alarm_threshold" {
  description = "Alarm when more than this many events are visible in the DLQ for 5 minutes (JiralakeDeadLetterQueueNotEmpty: 0, any event)."
  type        = number
  default     = 0
}

variable "dlq_oldest_message_age_alarm_threshold_s" {
  description = "Alarm when the oldest event in the DLQ is older than this many seconds for 10 minutes (JiralakeDeadLetterMessageOld: 7 days, half of SQS's retention)."
  type        = number
  default     = 604800
}
