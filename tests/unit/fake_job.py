"""Stands in for ``python -m batch_job`` in launcher tests: exits with the codes it is told.

``python tests/unit/fake_job.py CODES_FILE RUN_ID --attempt N`` exits with the N-th code listed in
CODES_FILE and appends "RUN_ID N" to CODES_FILE.log.
"""

from __future__ import annotations

import sys
from pathlib import Path

codes_file, run_id, _, attempt = sys.argv[1:5]
codes = Path(codes_file).read_text().split()
with Path(codes_file + ".log").open("a") as log:
    log.write(f"{run_id} {attempt}\n")
sys.exit(int(codes[int(attempt) - 1]))
