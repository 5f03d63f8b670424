"""Starting a run's job, and closing the books of a job that died without doing so itself."""

from __future__ import annotations

import logging

from slidebridge.launcher import JobLauncher
from slidebridge.outbound import OutboundPolicy
from slidebridge.runs import Item, Run, RunSource, RunTerminationReason
from slidebridge.settings import Settings
from slidebridge.store import RunStore

logger = logging.getLogger(__name__)


def close_failed_job(
    store: RunStore, settings: Settings, run_id: str, *, indices: list[int] | None, reason: str
) -> list[Item]:
    """End the job's open items SYSTEM_ERROR and tell the vendor's viewer; returns the items ended."""
    ended = store.fail_open_items(
        run_id, indices=indices, error_code="JOB_FAILED", error_message=f"the processing job failed: {reason}"
    )
    if not ended:
        return ended
    run = store.get_run(run_id)
    if run.source is RunSource.SECTRA:
        # Imported here: only Sectra runs need the Sectra client.
        from slidebridge.vendors.sectra_writer import SectraResultWriter  # noqa: PLC0415

        try:
            SectraResultWriter(
                store, run_id, settings=settings, policy=OutboundPolicy.from_settings(settings)
            ).write_message("Analysis failed: system error (the processing job stopped); please try again")
        except Exception:
            logger.warning("could not tell Sectra that run %s failed", run_id, exc_info=True)
    store.expire_credentials(run_id, settings.credential_ttl_after_run_s)
    return ended


def submit_run_job(store: RunStore, launcher: JobLauncher, run: Run, item_count: int) -> str:
    """Start the run's job and record its id; a run whose job cannot start is closed at once.

    Otherwise it would wait forever for a job that never comes.
    """
    try:
        job_id = launcher.submit(run.run_id, item_count)
    except Exception:
        logger.exception("could not start the job for run %s", run.run_id)
        store.terminate_run(
            run.run_id,
            RunTerminationReason.CANCELED_BY_SYSTEM,
            error_code="JOB_SUBMISSION_FAILED",
            error_message="the processing job could not be started; submit the run again",
        )
        raise
    store.set_job_id(run.run_id, job_id)
    return job_id
