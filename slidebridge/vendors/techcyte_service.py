"""What slidebridge does when Techcyte calls its webhook: one run per task, one item per scan.

The route parses the body (:class:`~slidebridge.vendors.techcyte.WebhookPayload`) and calls
:meth:`TechcyteService.accept`; the results go back later, from the job
(``slidebridge/vendors/techcyte_delivery.py``). Facts: vendors/TECHCYTE.md (§ numbers below).

Unknown (§11): Techcyte's retry policy, its webhook timeout and the answer it expects. We answer
200 ``{"message": "accepted", "run_id": …}`` at once, also to a repeated delivery of a task.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel

from slidebridge.applications import APPLICATIONS
from slidebridge.errors import NotFoundError, UrlNotAllowedError, ValidationFailedError
from slidebridge.jobs import deliver_techcyte_results, submit_run_job
from slidebridge.launcher import JobLauncher
from slidebridge.outbound import OutboundPolicy, Purpose
from slidebridge.runs import InputArtifact, Item, Run, RunSource
from slidebridge.settings import Settings
from slidebridge.store import DuplicateRunError, RunStore
from slidebridge.vendors.techcyte import WebhookPayload

logger = logging.getLogger(__name__)

# The task JWT (§4), stored apart from the run with a TTL once the run ends (DESIGN §3).
TASK_TOKEN = "techcyte_task_token"  # noqa: S105 - the credential's name, not a secret


class TechcyteRunContext(BaseModel):
    """What the job needs to post results back (no credentials: the JWT is stored apart)."""

    task_id: str
    task_number: int | None = None
    case_id: str | None = None
    company_id: str | None = None
    model: str | None = None
    scan_ids: list[str]
    stains: dict[str, str] = {}


class WebhookAccepted(BaseModel):
    """Our answer to the webhook (§3)."""

    message: str = "accepted"
    run_id: str


class TechcyteService:
    def __init__(self, settings: Settings, store: RunStore, launcher: JobLauncher, policy: OutboundPolicy) -> None:
        self.settings = settings
        self.store = store
        self.launcher = launcher
        self.policy = policy

    @staticmethod
    def idempotency_key(payload: WebhookPayload) -> str:
        # The same task may arrive as the base64 global id or the plain number (§5): key on the number.
        number = payload.task_number
        return f"techcyte:task:{number}" if number is not None else f"techcyte:task-id:{payload.task_id}"

    def accept(self, payload: WebhookPayload) -> WebhookAccepted:
        """Record the task as a run (one item per scan, the JWT apart) and start its job.

        A task seen before answers its run again and starts nothing. Every URL is checked against
        the download allowlist first: a refused one stores nothing (``UrlNotAllowedError`` naming the
        scan; the message carries the host, never the presigned query).
        """
        key = self.idempotency_key(payload)
        existing = self.store.find_idempotent_run(key)
        if existing is not None:
            logger.info("techcyte task %s delivered again; run %s already started", payload.task_id, existing)
            return WebhookAccepted(run_id=existing)
        application_id, version_number = self._application(payload)
        scan_ids = payload.scan_ids()
        for scan_id in scan_ids:
            for url in payload.urls(scan_id):
                try:
                    self.policy.check(url, Purpose.DOWNLOAD)
                except UrlNotAllowedError as exc:
                    raise UrlNotAllowedError(f"scan {scan_id}: {exc.message}") from None
        context = TechcyteRunContext(
            task_id=payload.task_id,
            task_number=payload.task_number,
            case_id=payload.case_id,
            company_id=payload.company_id,
            model=payload.model,
            scan_ids=scan_ids,
            stains={scan_id: stain for scan_id in scan_ids if (stain := payload.stain_of(scan_id)) is not None},
        )
        run = Run(
            application_id=application_id,
            version_number=version_number,
            source=RunSource.TECHCYTE,
            organization_id=self.settings.default_organization_id,
            submitted_by=f"techcyte:company:{payload.company_id or 'unknown'}",
            vendor_context=context.model_dump(mode="json"),
        )
        items = [
            Item(
                run_id=run.run_id,
                index=index,
                external_id=scan_id,
                custom_metadata={"techcyte_scan_id": scan_id, "stain": context.stains.get(scan_id)},
                input_artifacts=[
                    InputArtifact(name=f"scan-file-{number:03d}", download_url=url)
                    for number, url in enumerate(payload.urls(scan_id))
                ],
            )
            for index, scan_id in enumerate(scan_ids)
        ]
        credentials = {TASK_TOKEN: payload.jwt_token.get_secret_value()} if payload.jwt_token is not None else {}
        try:
            run = self.store.create_run(run, items, idempotency_key=key, credentials=credentials)
        except DuplicateRunError as exc:
            # A concurrent delivery of the same task won the race: it owns the job.
            return WebhookAccepted(run_id=exc.run_id)
        try:
            job_id = submit_run_job(self.store, self.launcher, run, len(items))
        except Exception:
            self._report_not_started(run.run_id)
            raise
        logger.info(
            "techcyte task started run %s (job %s)",
            run.run_id,
            job_id,
            extra={"task_id": payload.task_id, "scans": len(items), "has_jwt": payload.jwt_token is not None},
        )
        return WebhookAccepted(run_id=run.run_id)

    def _report_not_started(self, run_id: str) -> None:
        """Post the task's results (each scan "Analysis failed: …") when its job could not be submitted.

        ``submit_run_job`` has ended the run. A retried webhook finds that run and starts nothing, and
        Techcyte keeps a task open until results arrive: without this post it would wait forever.
        Best effort: a failure is logged and the caller re-raises the submission error.
        """
        try:
            deliver_techcyte_results(self.store, self.settings, run_id)
        except Exception:
            logger.exception("could not post the results of techcyte run %s, whose job did not start", run_id)

    def _application(self, payload: WebhookPayload) -> tuple[str, str]:
        """The application to run: the default, or the one the case algorithm names in
        ``model_id``/``model_name`` ("user supplied, to customise calls", §2) — an application id,
        optionally ``id@version``. An unknown name is the lab admin's configuration error: 422."""
        model = payload.model
        if model is None:
            return self.settings.default_application_id, self.settings.default_application_version
        application_id, _, version = model.partition("@")
        application = APPLICATIONS.get(application_id.strip())
        if application is None:
            raise ValidationFailedError(
                f"unknown model {model!r} in model_id/model_name: set it to one of "
                f"{', '.join(sorted(APPLICATIONS))}, or leave it empty for the default",
                loc=("body", "model_id" if payload.model_id else "model_name"),
            )
        try:
            return application.application_id, application.version(version.strip() or None).version_number
        except NotFoundError as exc:
            raise ValidationFailedError(
                f"model {model!r}: {exc}", loc=("body", "model_id" if payload.model_id else "model_name")
            ) from None
