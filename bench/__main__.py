"""``make bench``: every benchmark in turn, then one table of baseline against ours.

Each benchmark module that compares with a baseline has ``main(argv) -> list[BenchRow]`` and prints
its own details as it runs; ``bench.slide`` (a whole slide through the job, no baseline) prints its
figures only.
"""

from __future__ import annotations

import importlib
import os
import sys

from bench import BenchRow

# Run in this order; a module not (yet) in the tree is skipped.
COMPARED = ("tiles", "download", "webhook")


def table(rows: list[BenchRow]) -> str:
    """The rows as a text table: stage, baseline, ours, ratio (how many times better ours is), our
    absolute figure with its unit, and the core count."""
    cores = str(os.cpu_count() or "?")
    header = ("stage", "baseline", "ours", "ratio", "ours (absolute)", "cores")
    lines = [
        (
            row.stage,
            f"{row.baseline:,.1f}",
            f"{row.ours:,.1f}",
            f"{row.ratio:.2f}x",
            f"{row.ours:,.1f} {row.unit}" + ("" if row.higher_is_better else " (lower is better)"),
            cores,
        )
        for row in rows
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=True)]
    rule = "  ".join("-" * width for width in widths)
    left = (0, 4)  # text columns; figures are right-aligned

    def render(line: tuple[str, ...]) -> str:
        cells = zip(line, widths, strict=True)
        return "  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(cells))

    out = [render(line) for line in (header, *lines)]
    return "\n".join([out[0], rule, *out[1:]])


def main() -> None:
    rows: list[BenchRow] = []
    for name in COMPARED:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{name}":
                raise
            continue
        print(f"== bench.{name} ==", flush=True)
        rows.extend(module.main([]))
        print(flush=True)

    from bench import slide  # noqa: PLC0415 - starts a local stack; imported only when run

    print("== bench.slide: whole slide through python -m batch_job (CPU) ==", flush=True)
    sys.argv = [sys.argv[0]]
    slide.main()
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
