"""Where an item's input comes from and where its result goes, by run source.

- Platform: inputs from the submitted presigned URLs; the result is the S3 artifacts alone.
- Sectra: the slide through Sectra's file API; progress and the final result upserted into the
  viewer, failures shown there too (vendors/SECTRA.md §5, §7).
- Techcyte: each scan's presigned URLs (a DICOM series has several); the scan's result is kept
  until every scan of the task ended, then posted once for the task (``TechcyteDelivery``, called
  by the job runner after the item closed). Techcyte has no progress endpoint (TECHCYTE.md §11).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from batch_job.fetch import download
from slidebridge.analysis import SlideAnalysis
from slidebridge.artifacts import ArtifactStore
from slidebridge.outbound import OutboundPolicy
from slidebridge.runs import Item, Run, RunSource
from slidebridge.settings import Settings
from slidebridge.store import RunStore
from slidebridge.vendors.sectra import (
    ResultPayload,
    SectraClient,
    patch_collection_result,
    primitive_result,
    progress_result,
    regions_to_level0,
)
from slidebridge.vendors.sectra_writer import SectraResultWriter, SectraRunContext
from slidebridge.vendors.techcyte_delivery import TechcyteDelivery

logger = logging.getLogger(__name__)

Polygon = list[tuple[float, float]]


def download_input_artifacts(item: Item, inputs_dir: Path, settings: Settings, policy: OutboundPolicy) -> list[Path]:
    """Every input file of the item, one after the other, each with parallel ranged GETs; a CRC-32C
    given in the artifact's metadata is checked (the Platform API's ``checksum_base64_crc32c``)."""
    paths: list[Path] = []
    for number, artifact in enumerate(item.input_artifacts):
        result = download(
            artifact.download_url,
            inputs_dir / f"{number:03d}",
            policy=policy,
            expected_crc32c_b64=artifact.metadata.get("checksum_base64_crc32c"),
            part_size=settings.download_part_size_mb * 1024 * 1024,
            concurrency=settings.download_concurrency,
            timeout_s=settings.http_timeout_s,
            verify=str(settings.ca_bundle) if settings.ca_bundle else True,
        )
        paths.append(result.path)
    return paths


class Destination(Protocol):
    def fetch_inputs(self, item: Item, inputs_dir: Path) -> list[Path]:
        """Download the item's slide file(s) into ``inputs_dir``."""
        ...

    def regions(self) -> list[Polygon] | None:
        """Polygons in level-0 px to restrict the analysis to; None = the whole slide."""
        ...

    def on_progress(self, done: int, total: int) -> None: ...

    def deliver(self, item: Item, analysis: SlideAnalysis) -> None: ...

    def on_failure(self, message: str) -> None: ...


class PlatformDestination:
    def __init__(self, settings: Settings, policy: OutboundPolicy) -> None:
        self.settings = settings
        self.policy = policy

    def fetch_inputs(self, item: Item, inputs_dir: Path) -> list[Path]:
        return download_input_artifacts(item, inputs_dir, self.settings, self.policy)

    def regions(self) -> list[Polygon] | None:
        return None

    def on_progress(self, done: int, total: int) -> None:
        # The Platform API reports progress through the item states alone.
        pass

    def deliver(self, item: Item, analysis: SlideAnalysis) -> None:
        pass

    def on_failure(self, message: str) -> None:
        pass


class SectraDestination:
    def __init__(
        self,
        run: Run,
        store: RunStore,
        settings: Settings,
        policy: OutboundPolicy,
        *,
        client_factory: Callable[[str, str], SectraClient] | None = None,
    ) -> None:
        self.run = run
        self.settings = settings
        self.writer = SectraResultWriter(
            store, run.run_id, settings=settings, policy=policy, client_factory=client_factory, while_open=True
        )
        self.context = self.writer.context()
        self.steps = sorted(int(s) for s in settings.allowlist(settings.sectra_progress_steps))
        self._reported = 0

    def fetch_inputs(self, item: Item, inputs_dir: Path) -> list[Path]:
        return self.writer.client().download_slide_files(self.context.slide_id, inputs_dir)

    def regions(self) -> list[Polygon] | None:
        if not self.context.regions:
            return None
        # Sectra points are normalised by the image WIDTH (x/W, y/W); level-0 px = value × W.
        return regions_to_level0(self.context.regions, self.context.width)

    def on_progress(self, done: int, total: int) -> None:
        if total <= 0:
            return
        percent = done * 100 // total
        # Every step passed gets its own update, also when one batch passes several of them.
        for step in [step for step in self.steps if self._reported < step <= percent]:
            self._reported = step
            try:
                self.writer.write(functools.partial(self._progress_payload, pct=step))
            except Exception:
                # Progress is a courtesy: a failed progress write must not fail the analysis.
                logger.warning("progress upsert to Sectra failed at %d %%", step, exc_info=True)

    def _progress_payload(self, context: SectraRunContext, *, pct: int) -> ResultPayload:
        return progress_result(
            context.slide_id,
            context.width,
            context.height,
            application_version=self.run.version_number,
            progress_pct=pct,
            context=context.registration_context,
        )

    def deliver(self, item: Item, analysis: SlideAnalysis) -> None:
        if self.context.output == "patches":
            self.writer.write(
                lambda c: patch_collection_result(
                    analysis, c.slide_id, application_version=self.run.version_number, context=c.registration_context
                )
            )
        else:
            self.writer.write(
                lambda c: primitive_result(
                    analysis, c.slide_id, application_version=self.run.version_number, context=c.registration_context
                )
            )

    def on_failure(self, message: str) -> None:
        try:
            self.writer.write_message(message)
        except Exception:
            logger.warning("could not tell Sectra that the analysis failed", exc_info=True)


class TechcyteDestination(PlatformDestination):
    """Inputs like the Platform's (every URL of a scan into one folder: ``prepare_slide`` opens a DICOM
    series as one slide); no progress endpoint exists (TECHCYTE.md §11), and a scan's failure is posted
    with the task's results, from the item's error. The analysed scan's result is kept for that post."""

    def __init__(self, run: Run, delivery: TechcyteDelivery, settings: Settings, policy: OutboundPolicy) -> None:
        super().__init__(settings, policy)
        self.run = run
        self.delivery = delivery

    def deliver(self, item: Item, analysis: SlideAnalysis) -> None:
        self.delivery.save_scan_result(self.run, item, analysis)


def destination_for(
    run: Run, store: RunStore, settings: Settings, policy: OutboundPolicy, artifacts: ArtifactStore
) -> Destination:
    if run.source is RunSource.SECTRA:
        return SectraDestination(run, store, settings, policy)
    if run.source is RunSource.TECHCYTE:
        return TechcyteDestination(run, TechcyteDelivery(settings, store, artifacts, policy), settings, policy)
    return PlatformDestination(settings, policy)
