"""Faithful fakes of vendor APIs for tests (loopback servers only)."""
