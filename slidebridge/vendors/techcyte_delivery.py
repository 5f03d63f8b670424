"""Techcyte results, exactly once: one ``POST /external/results/{task_id}`` per task, when every scan ended.

Techcyte appends results (a second POST is a second evaluation the lab sees) and posting completes
the scans (vendors/TECHCYTE.md §7), so the task's results go out in one POST, after the last scan:

1. The job stores each analysed scan's result in S3 (:meth:`TechcyteDelivery.save_scan_result`);
   the POST may be made by another array child, a retried job or ``job_events``.
2. Whoever sees the run TERMINATED calls :meth:`TechcyteDelivery.deliver`: it takes the delivery
   lock in DynamoDB (``RunStore.claim_delivery``, a lease), builds one scanResult per scan (a failed
   or cancelled scan gets a result that says so, so the task completes instead of hanging), posts,
   and records the delivery. A concurrent caller waits for the holder to finish.
3. After an ambiguous failure (timeout, connection lost, 5xx), and whenever an earlier holder may
   have posted without recording it, ``GET /external/case_evaluations`` is searched for our run
   marker (``results.slidebridge_run``) before anything is sent again (§8).

Failure classes (§8 asks us to choose and document them):

- a scan that could not be read or analysed → a scanResult "Analysis failed: …" with
  ``qcFailReasons: ["analysis_failed"]`` (completes the scan, reads as no diagnosis);
- a run cancelled by an operator → "Analysis failed: cancelled (<reason>)", same shape (the
  scans it finished keep their results);
- Techcyte unreachable (connection errors, 5xx, 429 after retries) → the lock is released and the
  error re-raised as retryable: the job exits 75 and AWS Batch retries it; ``job_events`` tries
  once more when the job finally fails;
- Techcyte refuses the POST (4xx: validation is all-or-nothing; a scan with other than one image
  region; our credentials refused) → recorded as FAILED in the delivery record and the run's
  ``vendor_context.delivery_error``, logged as an error, never retried: an operator must look.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import boto3
from pydantic import BaseModel, SecretStr

from slidebridge.analysis import SlideAnalysis
from slidebridge.artifacts import ArtifactStore
from slidebridge.errors import RetryableError, SlidebridgeError
from slidebridge.outbound import OutboundPolicy
from slidebridge.runs import Item, ItemTerminationReason, Run, RunSource, RunState, utcnow
from slidebridge.settings import Settings
from slidebridge.store import Delivery, DeliveryBusyError, DeliveryClosedError, DeliveryState, RunStore
from slidebridge.vendors.techcyte import (
    ResultsPayload,
    ScanResult,
    TechcyteAuthError,
    TechcyteClient,
    TechcyteError,
    failed_scan_result,
    scan_result,
)
from slidebridge.vendors.techcyte_service import TASK_TOKEN, TechcyteRunContext

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient

logger = logging.getLogger(__name__)

CHANNEL = "techcyte-results"
SCAN_RESULT_FILE = "techcyte-scan-result.json"
# How often a caller waiting on another holder's lock looks again (seconds).
_WAIT_POLL_S = 2.0

ClientFactory = Callable[[Run, "SecretStr | None"], TechcyteClient]


class TechcyteDeliveryFailedError(SlidebridgeError):
    """Techcyte refused the task's results for good (a 4xx), or we have no credentials to post them."""


class TechcyteDeliveryPendingError(RetryableError):
    """Another holder kept the delivery lock longer than its lease allowed; try again later."""


class StoredScanResult(BaseModel):
    """What the job keeps per analysed scan until the task's one POST (S3, next to the artifacts)."""

    scan_result: ScanResult
    tissue_class_fractions: dict[str, float]


def load_client_credentials(
    settings: Settings, client: SecretsManagerClient | None = None
) -> tuple[str | None, SecretStr | None]:
    """The Techcyte API client id and secret: from the settings (local runs, and the batch job, to
    which Batch hands them as secrets), else from the Secrets Manager secret (the Lambdas)."""
    if settings.techcyte_client_id and settings.techcyte_client_secret is not None:
        return settings.techcyte_client_id, settings.techcyte_client_secret
    if settings.techcyte_credentials_secret_arn is None:
        return None, None
    client = client or boto3.client("secretsmanager")
    loaded = json.loads(client.get_secret_value(SecretId=settings.techcyte_credentials_secret_arn)["SecretString"])
    client_id = str(loaded.get("client_id") or "") or None
    secret = str(loaded.get("client_secret") or "") or None
    return client_id, SecretStr(secret) if secret is not None else None


class TechcyteDelivery:
    """Stores per-scan results and posts a task's results once. See the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: RunStore,
        artifacts: ArtifactStore,
        policy: OutboundPolicy,
        *,
        client_factory: ClientFactory | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self.artifacts = artifacts
        self.policy = policy
        self.client_factory = client_factory or self._default_client
        self._sleep = sleep
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, store: RunStore, policy: OutboundPolicy) -> TechcyteDelivery:
        return cls(settings, store, ArtifactStore(settings.bucket_name, prefix=settings.artifacts_prefix), policy)

    def _default_client(self, run: Run, task_token: SecretStr | None) -> TechcyteClient:
        client_id, client_secret = load_client_credentials(self.settings)
        if task_token is None and not (client_id and client_secret is not None):
            raise TechcyteAuthError(
                "no task token came with this task and no Techcyte API client id/secret is configured "
                "(SLIDEBRIDGE_TECHCYTE_CLIENT_ID/SECRET, or the Techcyte credentials secret)"
            )
        return TechcyteClient.from_settings(
            self.settings, policy=self.policy, task_token=task_token, client_id=client_id, client_secret=client_secret
        )

    # --- per scan (in the job) -----------------------------------------------------------------

    def _scan_result_key(self, run_id: str, item: Item) -> str:
        return self.artifacts.key_for(run_id, item.item_id, SCAN_RESULT_FILE)

    def save_scan_result(self, run: Run, item: Item, analysis: SlideAnalysis) -> ScanResult:
        """Build the scan's result (level-0 px GeoJSON, report, QC) and keep it for the task's POST."""
        result = scan_result(
            analysis,
            item.external_id,
            model_name=self.settings.techcyte_model_name,
            provider=self.settings.techcyte_provider,
            ruo=self.settings.techcyte_ruo,
            min_tissue_mm2=self.settings.techcyte_min_tissue_mm2,
            run_id=run.run_id,
            headline_class=self.settings.techcyte_headline_class,
        )
        stored = StoredScanResult(scan_result=result, tissue_class_fractions=analysis.summary.tissue_class_fractions)
        self.artifacts.put_bytes(
            self._scan_result_key(run.run_id, item), stored.model_dump_json().encode(), "application/json"
        )
        return result

    def _stored(self, run_id: str, item: Item) -> StoredScanResult | None:
        try:
            raw = self.artifacts.get_bytes(self._scan_result_key(run_id, item))
        except Exception:
            logger.exception("stored Techcyte result of scan %s (run %s) is unreadable", item.external_id, run_id)
            return None
        return StoredScanResult.model_validate_json(raw)

    # --- per task ------------------------------------------------------------------------------

    def deliver(self, run_id: str) -> Delivery | None:
        """Post the task's results if every scan ended and nobody has; returns the delivery record
        (None while scans are still running). Raises ``RetryableError`` (try later) or
        :class:`TechcyteDeliveryFailedError` (refused for good)."""
        run = self.store.get_run(run_id)
        if run.source is not RunSource.TECHCYTE:
            raise ValueError(f"run {run_id} did not come from Techcyte")
        if run.state is not RunState.TERMINATED:
            return None  # the last scan's job posts
        claim = self._claim(run_id)
        if claim.state is not DeliveryState.POSTING:
            return claim  # made (or given up) by another holder
        context = TechcyteRunContext.model_validate(run.vendor_context)
        try:
            payload, fractions = self._payload(run, context)
            token = self.store.get_credential(run_id, TASK_TOKEN)
            with self.client_factory(run, SecretStr(token) if token is not None else None) as client:
                if claim.attempts > 1 and client.find_posted(context.task_id, run_id):
                    # An earlier holder posted and could not record it: never post twice (§7).
                    logger.info("techcyte results of run %s were posted by an earlier attempt", run_id)
                else:
                    client.post_results(context.task_id, payload)
                    logger.info(
                        "techcyte results posted for run %s",
                        run_id,
                        extra={"task_id": context.task_id, "scans": len(payload.scanResults)},
                    )
                self.store.finish_delivery(run_id, CHANNEL, claim.holder, delivered=True)
                self.store.update_vendor_context(run_id, {"results_posted_at": utcnow().isoformat()})
                self._triage(client, context, fractions)
        except RetryableError as exc:
            logger.warning("techcyte results of run %s not posted yet: %s", run_id, exc)
            self.store.release_delivery(run_id, CHANNEL, claim.holder, error=str(exc))
            raise
        except TechcyteError as exc:
            logger.error("techcyte refused the results of run %s: %s", run_id, exc)
            self.store.finish_delivery(run_id, CHANNEL, claim.holder, delivered=False, error=exc.message)
            self.store.update_vendor_context(run_id, {"delivery_error": exc.message})
            raise TechcyteDeliveryFailedError(exc.message) from exc
        except Exception as exc:
            # Our own fault (or the table's): give the lock back so that a retry may finish the job.
            self.store.release_delivery(run_id, CHANNEL, claim.holder, error=f"{type(exc).__name__}")
            raise
        return self.store.get_delivery(run_id, CHANNEL)

    def _claim(self, run_id: str) -> Delivery:
        """The lock, or the closed record; waits while another holder's lease runs."""
        give_up_at = self._clock() + self.settings.techcyte_delivery_lease_s + 2 * _WAIT_POLL_S
        while True:
            try:
                return self.store.claim_delivery(run_id, CHANNEL, lease_s=self.settings.techcyte_delivery_lease_s)
            except DeliveryClosedError as exc:
                return exc.delivery
            except DeliveryBusyError:
                if self._clock() > give_up_at:
                    raise TechcyteDeliveryPendingError(
                        f"the techcyte results of run {run_id} are being posted by another job"
                    ) from None
                self._sleep(_WAIT_POLL_S)

    def _payload(self, run: Run, context: TechcyteRunContext) -> tuple[ResultsPayload, list[dict[str, float]]]:
        """One scanResult per scan, in the webhook's order; the class fractions of those analysed."""
        scans: list[ScanResult] = []
        fractions: list[dict[str, float]] = []
        for item in self.store.list_items(run.run_id):
            stored = (
                self._stored(run.run_id, item) if item.termination_reason is ItemTerminationReason.SUCCEEDED else None
            )
            if stored is not None:
                scans.append(stored.scan_result)
                fractions.append(stored.tissue_class_fractions)
            else:
                scans.append(
                    failed_scan_result(
                        item.external_id,
                        self._failure_text(run, item),
                        model_name=self.settings.techcyte_model_name,
                        provider=self.settings.techcyte_provider,
                        ruo=self.settings.techcyte_ruo,
                        run_id=run.run_id,
                    )
                )
        missing = set(context.scan_ids) - {scan.scanId for scan in scans}
        if missing:
            raise SlidebridgeError(f"run {run.run_id} has no item for scan(s) {', '.join(sorted(missing))}")
        return ResultsPayload(scanResults=scans), fractions

    @staticmethod
    def _failure_text(run: Run, item: Item) -> str:
        """What the lab reads for a scan without a result: the cause, never a URL query or a trace."""
        match item.termination_reason:
            case ItemTerminationReason.USER_ERROR:
                return f"the scan could not be read ({item.error_message or item.error_code or 'input error'})"
            case ItemTerminationReason.SKIPPED:
                return f"cancelled ({run.error_message or 'by an operator'})"
            case ItemTerminationReason.SUCCEEDED:
                return "system error (the stored result was lost); please request the analysis again"
            case _:
                if item.error_code == "RETRIES_EXHAUSTED":
                    return "system error (a service did not answer); please request the analysis again"
                if item.error_code == "JOB_FAILED":
                    return "system error (the processing job stopped); please request the analysis again"
                return "system error; please request the analysis again"

    def _triage(self, client: TechcyteClient, context: TechcyteRunContext, fractions: list[dict[str, float]]) -> None:
        """``PATCH /external/case`` with the configured class's highest share over the task's scans."""
        name = self.settings.techcyte_triage_class
        if name is None:
            return
        scores = [f[name] for f in fractions if name in f]
        if not scores:
            return
        score = round(max(scores), 4)
        category = "priority" if score >= self.settings.techcyte_triage_threshold else "routine"
        try:
            client.patch_triage(context.task_id, category=category, score=score)
        except TechcyteError as exc:
            # The results are in; triage is an ordering aid. Say so loudly, do not fail the run.
            logger.error("techcyte triage of task %s failed: %s", context.task_id, exc)


def describe(delivery: Delivery | None) -> dict[str, Any]:
    """The delivery record for logs and operators (no secrets in it)."""
    if delivery is None:
        return {"state": "waiting"}
    return {"state": delivery.state.value, "attempts": delivery.attempts, "error": delivery.error}
