"""The Batch job state-change Lambda."""
