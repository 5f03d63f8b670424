"""The fake Techcyte API for tests: it lives in ``local/fake_techcyte.py`` (``make demo`` uses it too)."""

from __future__ import annotations

from local.fake_techcyte import KNOWN_REPORT_TYPES, FakeScan, FakeTask, FakeTechcyte, Fault, global_id

__all__ = ["KNOWN_REPORT_TYPES", "FakeScan", "FakeTask", "FakeTechcyte", "Fault", "global_id"]
