"""The AWS CDK app for slidebridge (one stack, one construct per capability).

Nothing imports this package except ``app.py`` and ``tests/infra``. ``stack.create_app`` builds the app;
``bundle`` assembles the Lambda code directory the stack points at.
"""

from __future__ import annotations
