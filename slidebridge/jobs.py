"""Starting a run's job, and closing the books of a job that died without doing so itself."""

from __future__ import annotations

import contextlib
import logging

from slidebridge.errors import IllegalTransitionError, RetryableError
from slidebridge.launcher import CANCEL_REASON_PREFIX, JobLauncher
from slidebridge.outbound import OutboundPolicy
from slidebridge.runs import Item, Run, RunSource, RunState, RunTerminationReason
from slidebridge.settings import Settings
from slidebridge.store import RunStore

logger = logging.getLogger(__name__)


def close_failed_job(
    store: RunStore, settings: Settings, run_id: str, *, indices: list[int] | None, reason: str
) -> list[Item]:
    """End the job's open items SYSTEM_ERROR and tell the vendor; returns the items ended.

    Techcyte: once the run has ended, its results are posted if no job did (a job that died after
    its scan, or whose post kept failing). A transient failure to post is raised (``RetryableError``)
    so that the caller (the ``job_events`` Lambda's async invocation) tries again.
    """
    if reason.startswith(CANCEL_REASON_PREFIX):
        # Our own cancel stopped the job: the run ends cancelled (its open items SKIPPED), not failed.
        # The cancel normally ended it already; this covers a cancel whose own write did not land.
        ended = []
        with contextlib.suppress(IllegalTransitionError):
            store.terminate_run(
                run_id, RunTerminationReason.CANCELED_BY_USER, error_message=reason.removeprefix(CANCEL_REASON_PREFIX)
            )
    else:
        ended = store.fail_open_items(
            run_id, indices=indices, error_code="JOB_FAILED", error_message=f"the processing job failed: {reason}"
        )
    run = store.get_run(run_id)
    if run.source is RunSource.TECHCYTE and run.state is RunState.TERMINATED:
        deliver_techcyte_results(store, settings, run_id)
    if not ended:
        return ended
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


def deliver_techcyte_results(store: RunStore, settings: Settings, run_id: str) -> None:
    """Post a finished Techcyte task's results unless done; a refusal is logged and recorded, not raised."""
    # Imported here: only Techcyte runs need the Techcyte client.
    from slidebridge.vendors.techcyte_delivery import (  # noqa: PLC0415
        TechcyteDelivery,
        TechcyteDeliveryFailedError,
        describe,
    )

    try:
        delivery = TechcyteDelivery.from_settings(settings, store, OutboundPolicy.from_settings(settings)).deliver(
            run_id
        )
    except TechcyteDeliveryFailedError:
        return  # recorded on the run and in the delivery record, logged as an error
    logger.info("techcyte delivery of run %s: %s", run_id, describe(delivery))


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
        store.forget_launch(run.run_id)
        raise
    store.set_job_id(run.run_id, job_id)
    store.forget_launch(run.run_id)
    return job_id


def cancel_run(
    store: RunStore,
    launcher: JobLauncher,
    run_id: str,
    *,
    reason: str,
    credential_ttl_after_run_s: int | None = None,
    settings: Settings | None = None,
    termination_reason: RunTerminationReason = RunTerminationReason.CANCELED_BY_USER,
    error_code: str | None = None,
) -> Run:
    """End a run CANCELED_BY_USER: its job is stopped, its open items end SKIPPED, finished ones stay.

    Raises NotFoundError for an unknown run and IllegalTransitionError when the run has already
    ended (its job is then left alone). A job that cannot be stopped raises, and the run stays open
    so that the cancel can be tried again. With ``credential_ttl_after_run_s``, the run's vendor
    credentials expire that many seconds later, as after any other end of a run. The scheduler
    cancels overdue runs with ``termination_reason=CANCELED_BY_SYSTEM`` and an ``error_code``.
    """
    run = store.get_run(run_id)
    if run.state is RunState.TERMINATED:
        raise IllegalTransitionError(f"run {run_id} has already ended ({run.termination_reason})")
    if run.job_id:
        # The job first: once the run has ended nobody would stop a job that goes on running.
        launcher.cancel(run.job_id, reason)
    # Raises IllegalTransitionError too if the run ended meanwhile (its last item finished).
    cancelled = store.terminate_run(run_id, termination_reason, error_code=error_code, error_message=reason)
    if settings is not None and run.source is RunSource.TECHCYTE:
        # Techcyte has no cancel: the task stays open until results arrive, so its scans get results
        # that say "Analysis cancelled" (finished scans keep theirs).
        try:
            deliver_techcyte_results(store, settings, run_id)
        except RetryableError as exc:
            # job_events tries again when the stopped job's FAILED event arrives.
            logger.warning("techcyte results of cancelled run %s not posted yet: %s", run_id, exc)
    if credential_ttl_after_run_s is not None:
        store.expire_credentials(run_id, credential_ttl_after_run_s)
    logger.info("run %s cancelled (%s, job %s)", run_id, termination_reason.value, run.job_id)
    return cancelled
