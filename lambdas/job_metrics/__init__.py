"""The job telemetry Lambda: job log lines and queue backlog as CloudWatch metrics."""
