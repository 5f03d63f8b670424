"""``python -m slidebridge``: the operator CLI (``slidebridge/cli.py``)."""

from __future__ import annotations

from slidebridge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
