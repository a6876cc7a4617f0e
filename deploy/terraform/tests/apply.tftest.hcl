# `terraform test` with a mock AWS provider: an apply with the values known, offline and without an AWS
# account (tests/test_terraform.py runs it). `terraform validate` alone cannot catch an expression that
# only fails once its values are known, such as a conditional between tuples of different lengths.

mock_provider "aws" {
  override_resource {
    target = aws_sqs_queue.main
    values = {
      arn  = "arn:aws:sqs:eu-west-1:111122223333:jiralake.fifo"
      url  = "https://sqs.eu-west-1.amazonaws.com/111122223333/jiralake.fifo"
      name = "jiralake.fifo"
    }
  }
  override_resource {
    target = aws_sqs_queue.dlq
    values = {
      arn  = "arn:aws:sqs:eu-west-1:111122223333:jiralake-dlq.fifo"
      url  = "https://sqs.eu-west-1.amazonaws.com/111122223333/jiralake-dlq.fifo"
      name = "jiralake-dlq.fifo"
    }
  }
  override_resource {
    target = aws_s3_bucket.exports
    values = {
      arn    = "arn:aws:s3:::acme-jiralake-exports"
      bucket = "acme-jiralake-exports"
      id     = "acme-jiralake-exports"
    }
  }
}

variables {
  bucket_name = "acme-jiralake-exports"
}

run "defaults" {
  command = apply

  assert {
    condition     = length(jsondecode(aws_s3_bucket_policy.exports.policy).Statement) == 1
    error_message = "without a cross-account exporter the bucket policy holds only DenyInsecureTransport"
  }
}

run "cross_account_exporter" {
  command = apply

  variables {
    exporter_role_arn_cross_account = "arn:aws:iam::444455556666:role/jiralake-exporter"
  }

  assert {
    condition = alltrue([
      for statement in slice(jsondecode(aws_s3_bucket_policy.exports.policy).Statement, 1, length(jsondecode(aws_s3_bucket_policy.exports.policy).Statement)) :
      statement.Principal.AWS == "arn:aws:iam::444455556666:role/jiralake-exporter"
    ])
    error_message = "every statement after DenyInsecureTransport names the cross-account exporter"
  }

  assert {
    condition     = length(jsondecode(aws_s3_bucket_policy.exports.policy).Statement) > 1
    error_message = "a cross-account exporter gets the S3 statements of deploy/iam/exporter.json"
  }
}

run "trust_policy_per_role" {
  command = apply

  variables {
    assume_role_policy_json_by_role = {
      receiver = "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Principal\":{\"Federated\":\"arn:aws:iam::111122223333:oidc-provider/oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE\"},\"Action\":\"sts:AssumeRoleWithWebIdentity\",\"Condition\":{\"StringEquals\":{\"oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE:sub\":\"system:serviceaccount:jiralake:receiver\"}}}]}"
    }
  }

  assert {
    condition     = jsondecode(aws_iam_role.workload["receiver"].assume_role_policy).Statement[0].Condition.StringEquals["oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE:sub"] == "system:serviceaccount:jiralake:receiver"
    error_message = "the receiver role trusts only the receiver's service account"
  }

  assert {
    condition     = jsondecode(aws_iam_role.workload["consumer"].assume_role_policy).Statement[0].Principal.Service == ["ecs-tasks.amazonaws.com"]
    error_message = "a role missing from the map keeps the shared trust policy"
  }
}
