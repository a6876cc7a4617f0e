# Copy to terraform.tfvars (or pass with -var-file) and adjust. Every variable: README.md.

region      = "eu-west-1"
name        = "jiralake"
bucket_name = "acme-jiralake-exports"

tags = {
  team = "data-platform"
}

# Keep equal to the consumer's JIRALAKE_VISIBILITY_TIMEOUT_S and setup's JIRALAKE_MAX_RECEIVE_COUNT.
visibility_timeout_s = 60
max_receive_count    = 5

# Customer managed keys instead of SSE-SQS / SSE-S3 (their key policies must allow the roles):
# sqs_kms_key_arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
# s3_kms_key_arn  = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"

export_prefix                          = "jiralake"
abort_incomplete_multipart_upload_days = 1
noncurrent_version_expiration_days     = 30
history_expiration_days                = 730 # two years of daily snapshots
changes_expiration_days                = 90

# An exporter running in another account:
# exporter_role_arn_cross_account = "arn:aws:iam::444455556666:role/jiralake-exporter"

# ECS by default; for EKS Pod Identity: ["pods.eks.amazonaws.com"].
trusted_service_principals = ["ecs-tasks.amazonaws.com"]

# The on-call people's role or users (they must exist: IAM refuses a trust policy naming a principal
# that does not). Uncomment with yours to create the operator role.
# operator_principal_arns = ["arn:aws:iam::111122223333:role/oncall"]

alarm_sns_topic_arns = ["arn:aws:sns:eu-west-1:111122223333:jiralake-alerts"]
