"""The webhook receiver: Jira webhooks in, SQS FIFO messages out (see docs/receiver.md)."""
