"""``make bench``: every benchmark in turn."""

from __future__ import annotations

import sys

from bench import slide


def main() -> None:
    print("== bench.slide: whole slide through python -m batch_job (CPU) ==")
    sys.argv = [sys.argv[0]]
    slide.main()


if __name__ == "__main__":
    main()
