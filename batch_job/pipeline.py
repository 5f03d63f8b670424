"""One item: fetch → open → tissue → tiles → classify → artifacts → deliver.

The job reads everything but the run id (and item index) from the table and re-validates it with
the same pydantic models the API used. Errors decide the item's fate (slidebridge/errors.py):
UserInputError → USER_ERROR; RetryableError, or an AWS call still throttled or failing after
botocore's retries → handed back for another attempt (exit 75), or SYSTEM_ERROR on the last one;
anything else → SYSTEM_ERROR.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from batch_job.analyze import analyze_slide_timed
from batch_job.classifiers import get_classifier
from batch_job.destinations import Destination, destination_for
from batch_job.render import write_artifacts
from batch_job.slide import open_slide, prepare_slide
from batch_job.tiles import auto_workers
from slidebridge.artifacts import ArtifactStore
from slidebridge.aws_errors import is_transient_aws_error
from slidebridge.errors import IllegalTransitionError, RetryableError, UserInputError
from slidebridge.outbound import OutboundPolicy
from slidebridge.runs import Item, ItemState, ItemTerminationReason, OutputArtifact, Run, RunSource, RunState
from slidebridge.scheduling import end_if_overdue
from slidebridge.settings import Settings
from slidebridge.store import RunStore
from slidebridge.vendors.techcyte_delivery import TechcyteDelivery, TechcyteDeliveryFailedError, describe

logger = logging.getLogger(__name__)

EXIT_DONE = 0
EXIT_PERMANENT = 3
EXIT_RETRYABLE = 75


@dataclass
class JobContext:
    settings: Settings
    store: RunStore
    artifacts: ArtifactStore
    policy: OutboundPolicy
    attempt: int

    @classmethod
    def from_settings(cls, settings: Settings, *, attempt: int | None = None) -> JobContext:
        return cls(
            settings=settings,
            store=RunStore(settings.table_name),
            artifacts=ArtifactStore(settings.bucket_name, prefix=settings.artifacts_prefix),
            policy=OutboundPolicy.from_settings(settings),
            attempt=attempt if attempt is not None else settings.batch_job_attempt,
        )

    @property
    def last_attempt(self) -> bool:
        return self.attempt >= self.settings.batch_max_attempts


class StageTimer:
    """Seconds per stage, logged at the end of an item (where the time goes, per slide)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stage: str | None = None
        self._start = 0.0

    def start(self, stage: str) -> None:
        now = time.perf_counter()
        if self._stage is not None:
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + now - self._start
        self._stage, self._start = stage, now

    def stop(self) -> dict[str, float]:
        self.start("_")
        self.seconds.pop("_", None)
        return {k: round(v, 3) for k, v in self.seconds.items()}


def _worst(codes: list[int]) -> int:
    if EXIT_RETRYABLE in codes:
        return EXIT_RETRYABLE
    return EXIT_PERMANENT if EXIT_PERMANENT in codes else EXIT_DONE


def run_job(ctx: JobContext, run_id: str, item_index: int | None) -> int:
    """Process one item (array child) or every item of the run in turn, then post the run's
    results where the vendor takes them per run (Techcyte); returns the exit code."""
    # A deadline that passed while the job waited in the queue ends the run here (slidebridge.scheduling).
    run = end_if_overdue(ctx.store, run_id) or ctx.store.get_run(run_id)
    if run.state is RunState.TERMINATED:
        # Cancelled (or closed by job_events) before this job got to it, or a retry after the items
        # ended but the vendor post did not: only the post may be left.
        logger.info("run %s already %s; no item to process", run_id, run.termination_reason)
        return deliver_run_results(ctx, run)
    items = ctx.store.list_items(run_id)
    if item_index is not None:
        items = [item for item in items if item.index == item_index]
        if not items:
            logger.error("run %s has no item %d", run_id, item_index)
            return EXIT_PERMANENT
    codes: list[int] = []
    for item in items:
        if end_if_overdue(ctx.store, run_id) is not None:
            break  # the deadline passed (or the run was cancelled) meanwhile: its open items are SKIPPED
        codes.append(process_item(ctx, run, item))
    code = _worst(codes)
    if code == EXIT_RETRYABLE:
        return code  # an item goes again: the run cannot have ended
    return _worst([code, deliver_run_results(ctx, run)])


def deliver_run_results(ctx: JobContext, run: Run) -> int:
    """Techcyte: once every scan of the task ended, its one results POST (whichever job gets there;
    the delivery lock makes it exactly once). Other sources deliver per item."""
    if run.source is not RunSource.TECHCYTE:
        return EXIT_DONE
    try:
        delivery = TechcyteDelivery(ctx.settings, ctx.store, ctx.artifacts, ctx.policy).deliver(run.run_id)
    except TechcyteDeliveryFailedError:
        return EXIT_PERMANENT  # logged and recorded by the delivery; an operator must look
    except RetryableError as exc:
        if ctx.last_attempt:
            logger.error("techcyte results of run %s not posted after %d attempts: %s", run.run_id, ctx.attempt, exc)
            return EXIT_PERMANENT
        return EXIT_RETRYABLE
    logger.info("techcyte delivery of run %s: %s", run.run_id, describe(delivery))
    return EXIT_DONE


def process_item(ctx: JobContext, run: Run, item: Item) -> int:
    if item.state is ItemState.TERMINATED:
        # A retried job, or the run was cancelled: nothing left to do for this item.
        logger.info("item %d of run %s already %s; skipping", item.index, run.run_id, item.termination_reason)
        return EXIT_DONE
    if item.state is ItemState.PENDING:
        try:
            ctx.store.transition_item(run.run_id, item.index, ItemState.PROCESSING)
        except IllegalTransitionError:
            logger.info("item %d of run %s was closed meanwhile; skipping", item.index, run.run_id)
            return EXIT_DONE
    destination = destination_for(run, ctx.store, ctx.settings, ctx.policy, ctx.artifacts)
    workdir = ctx.settings.scratch_dir / run.run_id / str(item.index)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    log = {"run_id": run.run_id, "item_index": item.index, "item_id": item.item_id}
    try:
        outputs = _analyse(ctx, run, item, workdir, destination)
    except UserInputError as exc:
        logger.warning("item failed on its input: %s (%s)", exc.code, exc.message, extra=log)
        destination.on_failure(f"Analysis failed: {exc.message}")
        return _close(ctx, run, item, ItemTerminationReason.USER_ERROR, code=exc.code, message=exc.message)
    except RetryableError as exc:
        return _hand_back(ctx, run, item, destination, exc, log=log)
    except Exception as exc:
        if is_transient_aws_error(exc):
            # S3 or DynamoDB throttled or unavailable beyond botocore's own retries: another attempt.
            return _hand_back(ctx, run, item, destination, exc, log=log)
        logger.exception("item failed on our side", extra=log)
        destination.on_failure(f"Analysis failed: system error ({type(exc).__name__}); please try again")
        return _close(
            ctx,
            run,
            item,
            ItemTerminationReason.SYSTEM_ERROR,
            code="INTERNAL_ERROR",
            message=f"processing failed: {type(exc).__name__}",
            exit_code=EXIT_PERMANENT,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _close(ctx, run, item, ItemTerminationReason.SUCCEEDED, outputs=outputs)


def _hand_back(
    ctx: JobContext, run: Run, item: Item, destination: Destination, exc: Exception, *, log: dict[str, object]
) -> int:
    """A transient failure: the item goes back to PENDING for the next attempt (exit 75), or ends
    SYSTEM_ERROR when this was the last one."""
    if ctx.last_attempt:
        logger.error("transient failure on the last attempt: %s", exc, extra=log)
        destination.on_failure("Analysis failed: system error (a service did not answer); please try again")
        return _close(
            ctx,
            run,
            item,
            ItemTerminationReason.SYSTEM_ERROR,
            code="RETRIES_EXHAUSTED",
            message=f"gave up after {ctx.attempt} attempts: {type(exc).__name__}: {exc}",
            exit_code=EXIT_PERMANENT,
        )
    logger.warning("transient failure on attempt %d: %s; handing the item back", ctx.attempt, exc, extra=log)
    try:
        ctx.store.transition_item(run.run_id, item.index, ItemState.PENDING)
    except IllegalTransitionError:
        return EXIT_DONE
    return EXIT_RETRYABLE


def _close(
    ctx: JobContext,
    run: Run,
    item: Item,
    reason: ItemTerminationReason,
    *,
    code: str | None = None,
    message: str | None = None,
    outputs: list[OutputArtifact] | None = None,
    exit_code: int = EXIT_DONE,
) -> int:
    try:
        ctx.store.transition_item(
            run.run_id,
            item.index,
            ItemState.TERMINATED,
            reason=reason,
            error_code=code,
            error_message=message,
            output_artifacts=outputs,
        )
    except IllegalTransitionError:
        # Cancelled while we worked: the cancellation stands and our result is dropped.
        logger.info("item %d of run %s was closed meanwhile; result dropped", item.index, run.run_id)
        return EXIT_DONE
    if ctx.store.get_run(run.run_id).state is RunState.TERMINATED:
        # Vendor credentials outlive the run only briefly (DynamoDB TTL removes them).
        ctx.store.expire_credentials(run.run_id, ctx.settings.credential_ttl_after_run_s)
    return exit_code


def _analyse(ctx: JobContext, run: Run, item: Item, workdir: Path, destination: Destination) -> list[OutputArtifact]:
    timer = StageTimer()
    settings = ctx.settings
    timer.start("download")
    inputs = workdir / "input"
    inputs.mkdir()
    paths = destination.fetch_inputs(item, inputs)
    timer.start("open")
    slide_path = prepare_slide(paths, workdir / "slide")
    classifier = get_classifier(run.application_id, run.version_number)
    timer.start("analyse")
    analysis, timings = analyze_slide_timed(
        slide_path,
        classifier,
        tile_workers=auto_workers(settings.tile_workers),
        batch_size=settings.classifier_batch_size,
        progress=destination.on_progress,
        regions=destination.regions(),
    )
    timer.start("artifacts")
    out_dir = workdir / "out"
    out_dir.mkdir()
    with open_slide(slide_path) as slide:
        rendered = write_artifacts(analysis, slide, out_dir)
    outputs: list[OutputArtifact] = []
    for rendered_artifact in rendered:
        key = ctx.artifacts.key_for(run.run_id, item.item_id, rendered_artifact.path.name)
        metadata = ctx.artifacts.upload(rendered_artifact.path, key, rendered_artifact.media_type)
        outputs.append(OutputArtifact(name=rendered_artifact.name, s3_key=key, metadata=metadata))
    timer.start("delivery")
    destination.deliver(item, analysis)
    seconds = timer.stop()
    tiles_per_s = len(analysis.tiles) / seconds["analyse"] if seconds.get("analyse") else 0.0
    # One machine-readable line per item: operators grep it, bench/slide.py parses it.
    logger.info(
        "item metrics %s",
        json.dumps(
            {
                "run_id": run.run_id,
                "item_index": item.index,
                "tiles": len(analysis.tiles),
                "tiles_per_s": round(tiles_per_s, 1),
                "seconds": seconds,
                # "analyse" split into tissue, tiles_classify and regions; the stages above stay the
                # dashboard's (infra/monitoring.py JOB_STAGES, ANALYSE_STAGES), so this is a separate breakdown.
                "analyse_seconds": timings.seconds(),
                # Share of tiles_classify the classifier stood idle waiting for tiles (reading and
                # classifying overlap when it is near 0).
                "classifier_wait_fraction": round(timings.classify.wait_fraction, 3),
                "slide_px": [analysis.slide_width, analysis.slide_height],
            }
        ),
    )
    return outputs
