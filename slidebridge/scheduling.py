"""Run deadlines: a run still unfinished at its ``scheduling.deadline`` is cancelled by the system.

The same sweep also ends runs that never got a job (``close_unlaunched_runs``: the request that
created one was cut short before it submitted the job).

Two mechanisms for deadlines, both needed, neither needing a table scan:

- the **sweep** (``cancel_overdue_runs``) finds runs whose deadline has passed through their deadline
  records (a sparse gsi1 partition, see ``RunStore.due_deadlines``) and cancels the open ones like a
  user's cancel does (job stopped, open items SKIPPED, finished items keep their artifacts), with
  ``CANCELED_BY_SYSTEM`` and ``error_code`` ``SCHEDULER.DEADLINE_EXCEEDED``. In AWS an EventBridge
  schedule calls it every few minutes (``lambdas/scheduler``); the local stack runs it in a thread.
- the **job** checks before each item (``end_if_overdue``), so a job that only starts after the
  deadline (a long queue) or moves on to the next item after it processes nothing more, without
  waiting for the next sweep.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from slidebridge.errors import IllegalTransitionError, NotFoundError
from slidebridge.jobs import cancel_run, close_failed_job
from slidebridge.launcher import JobLauncher
from slidebridge.runs import Run, RunState, RunTerminationReason, utcnow
from slidebridge.settings import Settings
from slidebridge.store import RunStore

logger = logging.getLogger(__name__)

DEADLINE_ERROR_CODE = "SCHEDULER.DEADLINE_EXCEEDED"


def is_overdue(run: Run, now: datetime) -> bool:
    """Open and past its deadline."""
    deadline = run.scheduling.deadline if run.scheduling else None
    return deadline is not None and run.state is not RunState.TERMINATED and deadline <= now


def _message(run: Run) -> str:
    deadline = run.scheduling.deadline if run.scheduling else None
    when = deadline.isoformat().replace("+00:00", "Z") if deadline else "?"
    return f"the run's deadline ({when}) passed before it finished"


def cancel_overdue_runs(
    store: RunStore, launcher: JobLauncher, *, settings: Settings | None = None, now: datetime | None = None
) -> list[Run]:
    """Cancel every open run whose deadline is at or before ``now``; returns the runs it cancelled.

    A run that ended on its own loses its deadline record here too. One run's failure (its job could
    not be stopped) is logged and keeps its record, so that the next sweep tries again; the others
    go ahead.
    """
    now = now or utcnow()
    cancelled: list[Run] = []
    for run_id in list(store.due_deadlines(now)):
        try:
            run = store.get_run(run_id)
        except NotFoundError:
            store.forget_deadline(run_id)
            continue
        if run.state is not RunState.TERMINATED:
            try:
                cancelled.append(
                    cancel_run(
                        store,
                        launcher,
                        run_id,
                        reason=_message(run),
                        termination_reason=RunTerminationReason.CANCELED_BY_SYSTEM,
                        error_code=DEADLINE_ERROR_CODE,
                        settings=settings,
                        credential_ttl_after_run_s=settings.credential_ttl_after_run_s if settings else None,
                    )
                )
                logger.info("run %s cancelled: deadline passed", run_id)
            except IllegalTransitionError:
                pass  # it ended on its own meanwhile
            except Exception:
                logger.exception("could not cancel overdue run %s; the next sweep tries again", run_id)
                continue
        store.forget_deadline(run_id)
    return cancelled


NEVER_STARTED_REASON = "it was never started (the request that created the run was cut short); submit the run again"


def close_unlaunched_runs(store: RunStore, settings: Settings, *, now: datetime | None = None) -> list[str]:
    """End the runs that have had no job for ``settings.launch_grace_s`` since their submission.

    Their open items end SYSTEM_ERROR ``JOB_FAILED`` and the vendor is told, as for a job that died
    (``close_failed_job``); returns their ids. Launch records of runs that did get their job, or
    ended, are removed. A failure is logged and keeps the record for the next sweep.
    """
    submitted_before = (now or utcnow()) - timedelta(seconds=settings.launch_grace_s)
    closed: list[str] = []
    for run_id in list(store.due_launches(submitted_before)):
        try:
            run = store.get_run(run_id)
        except NotFoundError:
            store.forget_launch(run_id)
            continue
        if run.job_id is None and run.state is not RunState.TERMINATED:
            try:
                close_failed_job(store, settings, run_id, indices=None, reason=NEVER_STARTED_REASON)
            except Exception:
                logger.exception("could not close run %s, which never got a job; the next sweep tries again", run_id)
                continue
            logger.error("run %s never got a job (its creating request was cut short): closed", run_id)
            closed.append(run_id)
        store.forget_launch(run_id)
    return closed


def end_if_overdue(store: RunStore, run_id: str, *, now: datetime | None = None) -> Run | None:
    """For the job itself: end its run ``CANCELED_BY_SYSTEM`` if the deadline has passed.

    Returns the run as it now stands when it is (or already was) terminated, else None (go on).
    The job is not stopped through the launcher: the caller is the job, and it simply processes
    nothing more; open items end SKIPPED, so other children of an array job skip theirs too.
    """
    run = store.get_run(run_id)
    if run.state is RunState.TERMINATED:
        return run
    if not is_overdue(run, now or utcnow()):
        return None
    try:
        ended = store.terminate_run(
            run_id,
            RunTerminationReason.CANCELED_BY_SYSTEM,
            error_code=DEADLINE_ERROR_CODE,
            error_message=_message(run),
        )
    except IllegalTransitionError:
        return store.get_run(run_id)  # ended meanwhile (its last item, or the sweep)
    logger.info("run %s cancelled by its job: deadline passed", run_id)
    return ended
