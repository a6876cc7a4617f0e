terraform {
  # 1.5: `import` blocks and `check` blocks; validation may refer to the variable only.
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 6.8.0 is the first release whose aws_sqs_queue accepts max_message_size = 1048576 (1 MiB);
      # every 5.x release stops at 262144, below what the receiver and backfill send. See README.md.
      version = "~> 6.8"
    }
  }
}
