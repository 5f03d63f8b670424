"""Closing the books of a job that died without doing so itself (job_events, ProcessLauncher)."""

from __future__ import annotations

import logging

from slidebridge.outbound import OutboundPolicy
from slidebridge.runs import Item, RunSource
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
