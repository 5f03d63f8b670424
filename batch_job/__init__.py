"""The AWS Batch job: fetch a run's slides, analyse them with the classifier, deliver the results."""

from __future__ import annotations
