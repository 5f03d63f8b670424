"""slidebridge: shared domain for the API Lambda, the event Lambda and the batch job.

Never imports aws_cdk, Powertools, torch or openslide (see DESIGN §2).
"""

from __future__ import annotations

__version__ = "0.1.0"
