"""ProcessLauncher: a job it was asked to stop is not reported as failed (the canceller closes the run)."""

from __future__ import annotations

import sys
import time

from slidebridge.launcher import ProcessLauncher

SLEEPER = (sys.executable, "-c", "import time; time.sleep(60)")
DIES = (sys.executable, "-c", "import os, signal, time; time.sleep(0.3); os.kill(os.getpid(), signal.SIGTERM)")


def _wait_reaped(launcher: ProcessLauncher, job_id: str, failures: list[tuple[str, str]], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while job_id in launcher._jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job_id not in launcher._jobs, "job still running"
    time.sleep(0.5)  # the failure callback would run on the reaper thread right after the reap


def test_a_cancelled_job_is_not_reported_as_failed() -> None:
    failures: list[tuple[str, str]] = []
    launcher = ProcessLauncher(on_job_failed=lambda run_id, reason: failures.append((run_id, reason)), command=SLEEPER)
    job_id = launcher.submit("run-cancelled", 1)
    launcher.cancel(job_id, "cancelled by the user")
    _wait_reaped(launcher, job_id, failures)
    assert failures == []


def test_a_job_killed_by_someone_else_is_still_reported() -> None:
    failures: list[tuple[str, str]] = []
    launcher = ProcessLauncher(on_job_failed=lambda run_id, reason: failures.append((run_id, reason)), command=DIES)
    job_id = launcher.submit("run-killed", 1)
    _wait_reaped(launcher, job_id, failures)
    assert failures == [("run-killed", "local job killed by signal 15")]
