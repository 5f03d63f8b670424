"""Benchmarks: each runs alone (``python -m bench.<name>``) and prints its figures."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BenchRow:
    """One line of the ``make bench`` table: a stage measured for the baseline and for ours."""

    stage: str
    baseline: float
    ours: float
    unit: str
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        """How many times better ours is than the baseline (above 1: ours wins)."""
        if self.higher_is_better:
            return self.ours / self.baseline if self.baseline else float("inf")
        return self.baseline / self.ours if self.ours else float("inf")

    def summary(self) -> str:
        """The row as a benchmark prints it when run alone."""
        return f"{self.stage}: baseline {self.baseline:.2f}, ours {self.ours:.2f} {self.unit}, ratio {self.ratio:.2f}x"
