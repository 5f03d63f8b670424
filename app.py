"""CDK app entry point (cdk.json runs it; ``make synth`` builds the Lambda bundle first).

``infra.stack.create_app`` builds the one stack and applies the cdk-nag AWS Solutions checks.
"""

from __future__ import annotations

import sys

from infra.bundle import BundleError
from infra.config import InfraConfigError
from infra.stack import create_app


def main() -> int:
    try:
        app, _stack = create_app()
    except (InfraConfigError, BundleError) as exc:
        # A one-line reason instead of a jsii traceback: these are operator mistakes, not bugs.
        sys.stderr.write(f"slidebridge synth: {exc}\n")
        return 1
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
