"""What slidebridge does when Sectra calls: registration, create, cancel, delete, modify, notifications.

The routes parse and call one method here; the job side (progress and final upserts) lives in
``batch_job/destinations.py``. Facts and open questions: vendors/SECTRA.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from slidebridge.applications import get_application
from slidebridge.errors import IllegalTransitionError, NotFoundError
from slidebridge.jobs import submit_run_job
from slidebridge.launcher import JobLauncher
from slidebridge.outbound import OutboundPolicy
from slidebridge.runs import Item, Run, RunSource, RunState, RunTerminationReason, utcnow
from slidebridge.settings import Settings
from slidebridge.store import DuplicateRunError, RunStore
from slidebridge.vendors.sectra import (
    ImageNotification,
    Invocation,
    SectraClient,
    StoredResult,
    message_result,
    placeholder_result,
)
from slidebridge.vendors.sectra_writer import CALLBACK_TOKEN, SectraResultWriter, SectraRunContext, result_record

logger = logging.getLogger(__name__)

# Shown in place of the placeholder when the run could not be recorded or its job not submitted.
NOT_STARTED_TEXT = "Analysis could not be started: run it again"
CANCELLED_TEXT = "Analysis cancelled"
# Seconds all Sectra calls of one webhook request may take together (API Gateway gives up at 29 s).
WEBHOOK_SECTRA_BUDGET_S = 20.0

ClientFactory = Callable[[str, str], SectraClient]


class SectraService:
    def __init__(
        self,
        settings: Settings,
        store: RunStore,
        launcher: JobLauncher,
        policy: OutboundPolicy,
        *,
        feedback_writer: Callable[[str, str, bytes], None],
        client_factory: ClientFactory | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.launcher = launcher
        self.policy = policy
        self.feedback_writer = feedback_writer
        self.client_factory = client_factory or self._default_client

    def _default_client(self, callback_url: str, token: str) -> SectraClient:
        return SectraClient(
            callback_url,
            token,
            policy=self.policy,
            # The webhook must answer within API Gateway's 29 s: a create makes three Sectra calls or
            # more (slide info, list, POST/PUT, a re-list on a stale versionId), each retried once;
            # all of them together get WEBHOOK_SECTRA_BUDGET_S, the rest is ours (DynamoDB, Batch).
            timeout_s=min(self.settings.http_timeout_s, 8.0),
            ca_bundle=self.settings.ca_bundle,
            retries=1,
            deadline_s=WEBHOOK_SECTRA_BUDGET_S,
        )

    # --- registration -------------------------------------------------------------------------

    def registration(self, webhook_url: str) -> dict[str, Any]:
        """What the admin's "retrieve registration info" fills the form with (SECTRA.md §2)."""
        return {
            "applicationId": self.settings.sectra_application_id,
            "displayName": self.settings.sectra_display_name,
            "manufacturer": self.settings.sectra_manufacturer,
            "url": webhook_url,
            "inputTemplate": {"type": self.settings.sectra_input_type},
            "context": self.registration_context(),
        }

    def registration_context(self) -> dict[str, Any]:
        context = json.loads(self.settings.sectra_context or "{}")
        return context if isinstance(context, dict) else {}

    # --- create -------------------------------------------------------------------------------

    @staticmethod
    def idempotency_key(application_id: str, slide_id: str, cancellation_token: str | None) -> str:
        return f"sectra:{application_id}:{slide_id}:{cancellation_token or '-'}"

    def create(self, invocation: Invocation) -> dict[str, Any]:
        """Placeholder upsert → run recorded (token apart) → job submitted; answers the stored result.

        A repeated create (same applicationId, slideId, cancellationToken) answers the stored result
        again and starts nothing.
        """
        key = self.idempotency_key(invocation.applicationId, invocation.slideId, invocation.cancellationToken)
        existing = self.store.find_idempotent_run(key)
        if existing is not None:
            return self._stored_result_of(existing, invocation)
        # Checks callbackInfo.url against the allowlist before any request is made to it.
        client = self.client_factory(invocation.callbackInfo.url, invocation.callbackInfo.token.get_secret_value())
        info = client.get_slide_info(invocation.slideId)
        width, height = info.require_dimensions()
        version = get_application(self.settings.default_application_id).version(
            self.settings.default_application_version
        )
        stored = client.upsert_result(
            invocation.applicationId,
            invocation.slideId,
            placeholder_result(
                invocation.slideId,
                width,
                height,
                application_version=version.version_number,
                context=invocation.context,
            ),
        )
        context = SectraRunContext(
            application_id=invocation.applicationId,
            slide_id=invocation.slideId,
            callback_url=invocation.callbackInfo.url,
            cancellation_token=invocation.cancellationToken,
            input_type=invocation.input_type or "wholeSlide",
            regions=invocation.regions(),
            registration_context=invocation.context,
            width=width,
            height=height,
            result_id=stored.id,
            version_id=stored.versionId,
        )
        try:
            run = self._start_run(context, key, invocation.callbackInfo.token.get_secret_value(), stored)
        except Exception:
            # The placeholder is in Sectra already: without this it would say "Analysis queued" forever.
            self._report_not_started(client, context, key, stored, version.version_number)
            raise
        if run is None:
            return self._stored_result_of(self.store.find_idempotent_run(key) or "", invocation)
        return stored.model_dump(mode="json", exclude_none=True)

    def _start_run(self, context: SectraRunContext, key: str, token: str, stored: StoredResult) -> Run | None:
        run = Run(
            application_id=self.settings.default_application_id,
            version_number=self.settings.default_application_version,
            source=RunSource.SECTRA,
            organization_id=self.settings.default_organization_id,
            submitted_by=f"sectra:{context.application_id}",
            vendor_context={**context.model_dump(mode="json"), **result_record(stored)},
        )
        item = Item(run_id=run.run_id, index=0, external_id=context.slide_id)
        aliases = [f"sectra-slide:{context.application_id}:{context.slide_id}"]
        if stored.id is not None:
            aliases.append(f"sectra-result:{context.application_id}:{stored.id}")
        try:
            # The callback token and the lookups of a later cancel, delete or modify go in the same
            # transaction: a run never exists without them, and after it only the job can fail to
            # start (which submit_run_job closes the run for).
            run = self.store.create_run(
                run, [item], idempotency_key=key, credentials={CALLBACK_TOKEN: token}, aliases=aliases
            )
        except DuplicateRunError:
            # A concurrent retry of the same create won the race: it owns the job.
            return None
        job_id = submit_run_job(self.store, self.launcher, run, 1)
        logger.info("sectra create started run %s (job %s)", run.run_id, job_id)
        return run

    def _report_not_started(
        self, client: SectraClient, context: SectraRunContext, key: str, stored: StoredResult, version: str
    ) -> None:
        """Best effort: turn the placeholder into "could not be started" when the run or its job failed.

        A run that was recorded keeps the new result version, so later writes (delete, modify) send
        the current ``versionId``. Failing here is logged, never raised: the caller re-raises the
        original error, which is what the operator needs to see.
        """
        try:
            updated = client.upsert_result(
                context.application_id,
                context.slide_id,
                message_result(
                    context.slide_id,
                    context.width,
                    context.height,
                    application_version=version,
                    text=NOT_STARTED_TEXT,
                    context=context.registration_context,
                ),
                current=stored,
            )
            run_id = self.store.find_idempotent_run(key)
            if run_id is not None:
                self.store.update_vendor_context(run_id, result_record(updated))
        except Exception:
            logger.exception("could not tell Sectra that the analysis of a slide did not start")

    def _stored_result_of(self, run_id: str, invocation: Invocation) -> dict[str, Any]:
        """A repeated create's answer: our result on the slide as Sectra stores it now.

        From the run when it keeps the whole result; otherwise (a large final result) read back
        from Sectra with the repeat's own callback token, or, should that fail, its ids and text.
        """
        run = self.store.get_run(run_id)
        stored: dict[str, Any] = run.vendor_context.get("stored_result", {})
        if run.vendor_context.get("stored_result_complete", True):
            return stored
        try:
            client = self.client_factory(invocation.callbackInfo.url, invocation.callbackInfo.token.get_secret_value())
            for candidate in client.list_results(invocation.applicationId, invocation.slideId):
                if candidate.id == stored.get("id"):
                    return candidate.model_dump(mode="json", exclude_none=True)
        except Exception:
            logger.warning("could not read run %s's result back from Sectra; answering its ids", run_id, exc_info=True)
        return stored

    # --- cancel / delete / modify -------------------------------------------------------------

    def _find_run(self, invocation: Invocation) -> Run | None:
        run_id = None
        if invocation.cancellationToken:
            run_id = self.store.find_idempotent_run(
                self.idempotency_key(invocation.applicationId, invocation.slideId, invocation.cancellationToken)
            )
        stored = invocation.stored_result()
        if run_id is None and stored is not None and stored.id is not None:
            run_id = self.store.find_alias(f"sectra-result:{invocation.applicationId}:{stored.id}")
        if run_id is None:
            run_id = self.store.find_alias(f"sectra-slide:{invocation.applicationId}:{invocation.slideId}")
        if run_id is None:
            return None
        try:
            return self.store.get_run(run_id)
        except NotFoundError:
            return None

    def _stop(self, run: Run, reason: str) -> bool:
        """Stop the run's job and end the run (CANCELED_BY_USER); False when it had already ended."""
        if run.state is RunState.TERMINATED:
            return False
        if run.job_id:
            self.launcher.cancel(run.job_id, reason)
        try:
            self.store.terminate_run(run.run_id, RunTerminationReason.CANCELED_BY_USER, error_message=reason)
        except IllegalTransitionError:
            return False
        self.store.expire_credentials(run.run_id, self.settings.credential_ttl_after_run_s)
        return True

    def cancel(self, invocation: Invocation) -> list[Any]:
        """Terminate the job, pending items SKIPPED, the result says "Analysis cancelled"; answers [].

        A repeated cancel (Sectra retrying one whose message could not be written) writes the
        message if it is still missing; a run that had finished or failed is left as it is.
        """
        run = self._find_run(invocation)
        if run is None:
            return []
        # ``run`` was read just now: when this cancel does not stop it, it shows how the run ended.
        if not self._stop(run, "cancelled in Sectra"):
            shown = run.vendor_context.get("stored_result", {}).get("displayResult")
            if run.termination_reason is not RunTerminationReason.CANCELED_BY_USER or shown == CANCELLED_TEXT:
                return []
        # The cancel carries a fresh callback token: the message is written with it, and it expires
        # like every credential of an ended run.
        self.store.put_credential(
            run.run_id,
            CALLBACK_TOKEN,
            invocation.callbackInfo.token.get_secret_value(),
            expires_at=utcnow() + timedelta(seconds=self.settings.credential_ttl_after_run_s),
        )
        self._writer(run.run_id).write_message(CANCELLED_TEXT)
        return []

    def _writer(self, run_id: str) -> SectraResultWriter:
        return SectraResultWriter(
            self.store, run_id, settings=self.settings, policy=self.policy, client_factory=self.client_factory
        )

    def delete(self, invocation: Invocation) -> dict[str, Any]:
        """The pathologist deleted our result: stop any job writing to it; no further writes. Answers {}."""
        run = self._find_run(invocation)
        if run is not None:
            # Flag first, so a job between two upserts sees it before its next write.
            self.store.update_vendor_context(run.run_id, {"result_deleted": True})
            self._stop(run, "result deleted in Sectra")
        return {}

    def modify(self, invocation: Invocation) -> dict[str, Any]:
        """PUT the pathologist's change (current versionId), keep it as feedback, answer the stored result."""
        changed = invocation.stored_result()
        if changed is None or changed.id is None:
            raise NotFoundError("modify carries no stored result with an id")
        client = self.client_factory(invocation.callbackInfo.url, invocation.callbackInfo.token.get_secret_value())
        stored = client.update_result(invocation.applicationId, changed.id, changed)
        run = self._find_run(invocation)
        owner = run.run_id if run is not None else f"slide-{invocation.slideId}"
        # Feedback for model improvement: what the pathologist changed, linked to the run.
        self.feedback_writer(
            owner,
            f"{utcnow().strftime('%Y%m%dT%H%M%S%fZ')}-modify.json",
            json.dumps(
                {
                    "run_id": run.run_id if run is not None else None,
                    "application_id": invocation.applicationId,
                    "slide_id": invocation.slideId,
                    "received_at": utcnow().isoformat(),
                    "result": changed.model_dump(mode="json"),
                }
            ).encode(),
        )
        if run is not None:
            self.store.update_vendor_context(run.run_id, result_record(stored))
        return stored.model_dump(mode="json", exclude_none=True)

    # --- image notification -------------------------------------------------------------------

    def image_notification(self, notification: ImageNotification) -> dict[str, Any]:
        """New slide imported: start a whole-slide run only when the registration enables auto-run.

        Sectra notifies every imported slide, whatever its stain. With ``autoRunStains`` in the
        registration context (e.g. ``["H&E"]``) only slides whose ``imageInfo.staining`` is one of
        them are analysed (compared without case, spaces or punctuation: "H & E" is "H&E"); a slide
        whose stain is not given is then left alone too.
        """
        # Sectra echoes the registration context; where it does not, ours is the one registered.
        context = notification.context or self.registration_context()
        if context.get("autoRun") is not True:
            return {}
        stains = context.get("autoRunStains")
        if isinstance(stains, list):
            stain = notification.imageInfo.staining_name if notification.imageInfo else None
            if stain is None or _stain_key(stain) not in {_stain_key(str(s)) for s in stains}:
                logger.info("image notification: stain %r is not among autoRunStains; not analysed", stain)
                return {}
        invocation = Invocation.model_validate(
            {
                "action": "create",
                "applicationId": notification.applicationId,
                "slideId": notification.slideId,
                "callbackInfo": {
                    "url": notification.callbackInfo.url,
                    "token": notification.callbackInfo.token.get_secret_value(),
                },
                "context": context,
                "cancellationToken": notification.cancellationToken or "image-notification",
                "input": {"type": "wholeSlide"},
            }
        )
        self.create(invocation)
        return {}


def _stain_key(name: str) -> str:
    """A stain name as compared: lower case, letters and digits only ("H & E", "h&e" → "he")."""
    return "".join(ch for ch in name.lower() if ch.isalnum())
