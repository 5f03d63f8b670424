"""``python -m batch_job RUN_ID [--item INDEX]``: the only place that sets the job's exit code.

Exit codes (the job definition's retry strategy relies on them): 0 done, including items that
ended USER_ERROR; 75 retryable (Batch tries again); 3 permanent (Batch gives up).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from batch_job.pipeline import EXIT_PERMANENT, EXIT_RETRYABLE, JobContext, run_job
from slidebridge.aws_errors import is_transient_aws_error
from slidebridge.errors import NotFoundError, RetryableError
from slidebridge.settings import get_settings


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Batch's TerminateJob (a cancel, the job timeout) and the local launcher stop the job with
    # SIGTERM, then SIGKILL. Python's default for SIGTERM is to die on the spot; as an exception the
    # stack unwinds instead, so the item's `finally` removes its scratch copy of the slide (GBs on the
    # instance's disk) and the tile workers and their shared memory are shut down.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batch_job", description="Process a slidebridge run.")
    parser.add_argument("run_id")
    parser.add_argument(
        "--item", type=int, default=None, help="item index (default: AWS_BATCH_JOB_ARRAY_INDEX, else all)"
    )
    parser.add_argument("--attempt", type=int, default=None, help="attempt number (default: AWS_BATCH_JOB_ATTEMPT)")
    args = parser.parse_args(argv)
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s run=" + args.run_id + " %(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    index = args.item if args.item is not None else settings.batch_array_index
    ctx = JobContext.from_settings(settings, attempt=args.attempt)
    try:
        return run_job(ctx, args.run_id, index)
    except NotFoundError as exc:
        logging.getLogger("batch_job").error("%s", exc)
        return EXIT_PERMANENT
    except RetryableError as exc:
        logging.getLogger("batch_job").warning("transient failure outside an item: %s", exc)
        return EXIT_RETRYABLE
    except Exception as exc:
        # E.g. DynamoDB throttled while the run was read or an item closed after its result went
        # out. Exit 1 would make Batch give up and job_events report a failure over the result.
        if not is_transient_aws_error(exc):
            raise
        logging.getLogger("batch_job").warning("AWS failure outside an item's analysis: %s; trying again", exc)
        return EXIT_RETRYABLE


if __name__ == "__main__":
    sys.exit(main())
