"""JobLauncher port: AWS Batch in the cloud, a local subprocess on one machine.

Only the run id (and, in array jobs, the index Batch adds) crosses into the job; the job reads
everything else from the table and re-validates it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import boto3

from slidebridge.settings import Settings
from slidebridge.store import RunStore

if TYPE_CHECKING:
    from mypy_boto3_batch import BatchClient

logger = logging.getLogger(__name__)


class JobLauncher(Protocol):
    def submit(self, run_id: str, item_count: int) -> str:
        """Start the job for a run; returns the job id."""
        ...

    def cancel(self, job_id: str, reason: str) -> None:
        """Stop the job (no-op when it already ended)."""
        ...


# Starts the reason of every job slidebridge stops on purpose (Batch reports it as the FAILED event's
# statusReason), so that a cancelled job's event is not mistaken for a job that died.
CANCEL_REASON_PREFIX = "slidebridge cancel: "


class BatchLauncher:
    """SubmitJob with only the run id; an array job (child i = item i) for runs of several items."""

    def __init__(self, job_queue: str, job_definition: str, client: BatchClient | None = None) -> None:
        self.job_queue = job_queue
        self.job_definition = job_definition
        self._client = client

    @property
    def client(self) -> BatchClient:
        if self._client is None:
            self._client = boto3.client("batch")
        return self._client

    def submit(self, run_id: str, item_count: int) -> str:
        kwargs: dict[str, object] = {}
        if item_count > 1:
            kwargs["arrayProperties"] = {"size": item_count}
        response = self.client.submit_job(
            jobName=f"slidebridge-{run_id}",
            jobQueue=self.job_queue,
            # The stack passes the definition's full, revisioned ARN, which CloudFormation updates with
            # every new revision (and IAM allows exactly that one): the current revision is submitted.
            jobDefinition=self.job_definition,
            parameters={"run_id": run_id},
            tags={"slidebridge:run_id": run_id},
            propagateTags=True,
            **kwargs,
        )
        job_id: str = response["jobId"]
        logger.info("submitted batch job %s for run %s (%d items)", job_id, run_id, item_count)
        return job_id

    def cancel(self, job_id: str, reason: str) -> None:
        # TerminateJob stops running and queued jobs alike (and every child of an array job). The
        # marker tells job_events that the FAILED event it will get was our own cancel.
        self.client.terminate_job(jobId=job_id, reason=(CANCEL_REASON_PREFIX + reason)[:255])


class ProcessLauncher:
    """``python -m batch_job RUN_ID`` as a local subprocess with the same environment.

    One process handles all items of the run in turn, where Batch would run an array job. Like the
    job definition's retry strategy, an exit code 75 starts the next attempt, up to ``max_attempts``.
    """

    _PREFIX = "local-"

    def __init__(
        self,
        max_attempts: int = 3,
        on_job_failed: Callable[[str, str], None] | None = None,
        *,
        command: Sequence[str] = (sys.executable, "-m", "batch_job"),
    ) -> None:
        self.max_attempts = max_attempts
        self.command = tuple(command)
        # Plays the part of the job_events Lambda: told (run id, reason) when a job dies for good.
        self.on_job_failed = on_job_failed
        self._jobs: dict[str, subprocess.Popen[bytes]] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._counter = 0

    def submit(self, run_id: str, item_count: int) -> str:
        with self._lock:
            self._counter += 1
            job_id = f"{self._PREFIX}{os.getpid()}-{self._counter}"
        self._start(job_id, run_id, attempt=1)
        logger.info("started local job %s for run %s (%d items)", job_id, run_id, item_count)
        return job_id

    def _start(self, job_id: str, run_id: str, attempt: int) -> None:
        process = subprocess.Popen(
            [*self.command, run_id, "--attempt", str(attempt)],
            # Its own process group, so cancel stops the tile workers too.
            start_new_session=True,
        )
        with self._lock:
            self._jobs[job_id] = process
        # Reap it when it ends (no zombies) and retry it as Batch would.
        threading.Thread(target=self._reap, args=(job_id, run_id, attempt, process), daemon=True).start()

    def _reap(self, job_id: str, run_id: str, attempt: int, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        logger.info("local job %s (attempt %d) exited with %d", job_id, attempt, code)
        with self._lock:
            cancelled = job_id in self._cancelled
            retry = code == 75 and attempt < self.max_attempts and not cancelled
            if not retry:
                self._jobs.pop(job_id, None)
        if retry:
            self._start(job_id, run_id, attempt + 1)
        elif code != 0 and not cancelled and self.on_job_failed is not None:
            # A job we stopped did not fail: whoever cancelled it closes its run (open items end SKIPPED).
            # Reporting it would race that cancel and could end its items SYSTEM_ERROR instead.
            reason = f"local job exited with {code}" if code > 0 else f"local job killed by signal {-code}"
            try:
                self.on_job_failed(run_id, reason)
            except Exception:
                logger.exception("could not close the books of failed job %s", job_id)

    def cancel(self, job_id: str, reason: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)
            process = self._jobs.get(job_id)
        if process is None or process.poll() is not None:
            return
        logger.info("terminating local job %s: %s", job_id, reason)
        os.killpg(process.pid, signal.SIGTERM)

    def terminate_all(self) -> None:
        with self._lock:
            self._cancelled.update(self._jobs)
            processes = list(self._jobs.values())
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


_process_launcher: ProcessLauncher | None = None


def launcher_from_settings(settings: Settings) -> JobLauncher:
    """The launcher the ``launcher`` setting names (one ProcessLauncher per process)."""
    global _process_launcher  # noqa: PLW0603 - one registry of local child processes per process
    if settings.launcher == "process":
        if _process_launcher is None:
            store = RunStore(settings.table_name)

            def close_books(run_id: str, reason: str) -> None:
                # Imported here: slidebridge.jobs reaches the vendor writers, which import this module's users.
                from slidebridge.jobs import close_failed_job  # noqa: PLC0415

                close_failed_job(store, settings, run_id, indices=None, reason=reason)

            _process_launcher = ProcessLauncher(settings.batch_max_attempts, on_job_failed=close_books)
        return _process_launcher
    return BatchLauncher(settings.job_queue, settings.job_definition)
