"""Writes a run's Sectra result in place: progress, final content, failure messages.

Used by the batch job (progress and final upserts) and by ``job_events`` (a job that died). Each
write re-reads the run first: a result the pathologist deleted is never written again, and the
latest ``versionId`` is always the one sent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from slidebridge.errors import NotFoundError, RetryableError
from slidebridge.outbound import OutboundPolicy
from slidebridge.runs import RunState
from slidebridge.settings import Settings
from slidebridge.store import RunStore
from slidebridge.vendors.sectra import (
    ResultPayload,
    SectraClient,
    SectraConflictError,
    StoredResult,
    message_result,
)

logger = logging.getLogger(__name__)

CALLBACK_TOKEN = "sectra_callback_token"  # noqa: S105 - the credential's name, not a secret

# A DynamoDB item holds at most 400 KB, and a final result with thousands of outline vertices is
# larger (20 000 points: about 640 KB). The run keeps Sectra's stored result whole only up to this
# size; beyond it, what the next PUT and the viewer's text need (ids, display fields) without ``data``.
STORED_RESULT_MAX_BYTES = 32 * 1024


def result_record(stored: StoredResult) -> dict[str, Any]:
    """The run's ``vendor_context`` fields for the result Sectra stored last.

    ``stored_result_complete`` says whether ``stored_result`` is the whole result or its ids and
    display fields only (then a retried create reads the whole one back from Sectra).
    """
    whole = stored.model_dump(mode="json", exclude_none=True)
    complete = len(json.dumps(whole, separators=(",", ":"))) <= STORED_RESULT_MAX_BYTES
    return {
        "result_id": stored.id,
        "version_id": stored.versionId,
        "stored_result": whole if complete else {k: v for k, v in whole.items() if k not in ("data", "attachments")},
        "stored_result_complete": complete,
    }


class SectraRunContext(BaseModel):
    """What the job needs to talk back to Sectra (no credentials: those are stored apart)."""

    application_id: str
    slide_id: str
    callback_url: str
    cancellation_token: str | None = None
    input_type: str = "wholeSlide"
    # Normalised Sectra polygons (x and y divided by the image width) to restrict the analysis to.
    regions: list[list[tuple[float, float]]] = []
    registration_context: dict[str, Any] = {}
    width: int
    height: int
    result_id: int | str | None = None
    version_id: str | None = None
    result_deleted: bool = False

    @property
    def output(self) -> str:
        """ "patches" for a patch gallery, else "primitive" (registration context ``{"output": …}``)."""
        return "patches" if self.registration_context.get("output") == "patches" else "primitive"


class SectraResultWriter:
    def __init__(
        self,
        store: RunStore,
        run_id: str,
        *,
        settings: Settings,
        policy: OutboundPolicy,
        client_factory: Callable[[str, str], SectraClient] | None = None,
        while_open: bool = False,
    ) -> None:
        """``while_open``: write only while the run is open (the job's writes). Once a cancel, the
        deadline or job_events has ended the run, its message stands; a late progress step or result
        from a job that has not stopped yet must not replace it."""
        self.store = store
        self.run_id = run_id
        self.while_open = while_open
        self.settings = settings
        self.policy = policy
        self._client_factory = client_factory
        self._client: SectraClient | None = None
        self._run_version = settings.default_application_version

    def context(self) -> SectraRunContext:
        return SectraRunContext.model_validate(self.store.get_run(self.run_id).vendor_context)

    def client(self) -> SectraClient:
        if self._client is None:
            context = self.context()
            token = self.store.get_credential(self.run_id, CALLBACK_TOKEN)
            if token is None:
                raise NotFoundError(f"no Sectra callback token stored for run {self.run_id} (expired?)")
            if self._client_factory is not None:
                self._client = self._client_factory(context.callback_url, token)
            else:
                self._client = SectraClient(
                    context.callback_url,
                    token,
                    policy=self.policy,
                    timeout_s=self.settings.http_timeout_s,
                    ca_bundle=self.settings.ca_bundle,
                )
        return self._client

    def write(self, build: Callable[[SectraRunContext], ResultPayload]) -> StoredResult | None:
        """Upsert the payload ``build`` makes from the current context; None when the result is deleted."""
        run = self.store.get_run(self.run_id)
        context = SectraRunContext.model_validate(run.vendor_context)
        if context.result_deleted:
            logger.info("sectra result of run %s was deleted; not writing", self.run_id)
            return None
        if self.while_open and run.state is RunState.TERMINATED:
            logger.info("run %s has ended (%s); not writing over its result", self.run_id, run.termination_reason)
            return None
        current = (
            StoredResult.model_validate(run.vendor_context["stored_result"])
            if context.result_id is not None and run.vendor_context.get("stored_result")
            else None
        )
        self._run_version = run.version_number
        payload = build(context)
        try:
            stored = self.client().upsert_result(context.application_id, context.slide_id, payload, current=current)
        except SectraConflictError as exc:
            # A PUT whose answer was lost may have been applied already: then Sectra holds exactly
            # what we sent, and the conflict only means our versionId is stale. Anything else is
            # another writer racing us: try again later rather than fail the analysis.
            stored_now = self._already_applied(context, payload)
            if stored_now is None:
                raise RetryableError(f"Sectra result kept changing under us: {exc}") from exc
            stored = stored_now
        self.store.update_vendor_context(self.run_id, result_record(stored))
        return stored

    def _already_applied(self, context: SectraRunContext, payload: ResultPayload) -> StoredResult | None:
        # Compared on what the pathologist sees (headline, properties, result type): Sectra may store
        # the content itself normalised (defaults filled in, unknown primitives dropped).
        sent = payload.to_wire()
        sent_type = sent["data"]["result"]["type"]
        for candidate in reversed(self.client().list_results(context.application_id, context.slide_id)):
            wire = candidate.to_wire()
            kind = ((wire.get("data") or {}).get("result") or {}).get("type")
            if (
                wire.get("displayResult") == sent["displayResult"]
                and wire.get("displayProperties") == sent["displayProperties"]
                and kind == sent_type
            ):
                return candidate
        return None

    def write_message(self, text: str) -> StoredResult | None:
        return self.write(
            lambda c: message_result(
                c.slide_id,
                c.width,
                c.height,
                application_version=self._run_version,
                text=text,
                context=c.registration_context,
            )
        )
