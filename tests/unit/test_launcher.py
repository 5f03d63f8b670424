"""ProcessLauncher: the local stand-in for AWS Batch retries on 75 and reports jobs that die."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from slidebridge.launcher import ProcessLauncher

FAKE_JOB = Path(__file__).parent / "fake_job.py"


def _launcher(tmp_path: Path, codes: str, max_attempts: int = 3) -> tuple[ProcessLauncher, Path, list[tuple[str, str]]]:
    codes_file = tmp_path / "codes"
    codes_file.write_text(codes)
    failures: list[tuple[str, str]] = []
    launcher = ProcessLauncher(
        max_attempts,
        on_job_failed=lambda run_id, reason: failures.append((run_id, reason)),
        command=(sys.executable, str(FAKE_JOB), str(codes_file)),
    )
    return launcher, codes_file, failures


def _wait_idle(launcher: ProcessLauncher, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while launcher._jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not launcher._jobs, "job still running"
    # The failure callback runs on the reaper thread right after the last process ends.
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.daemon:
            thread.join(timeout=5)


def test_exit_75_is_retried_until_success(tmp_path: Path) -> None:
    launcher, codes_file, failures = _launcher(tmp_path, "75 75 0")
    launcher.submit("run-1", 1)
    _wait_idle(launcher)
    assert Path(str(codes_file) + ".log").read_text().split("\n")[:3] == ["run-1 1", "run-1 2", "run-1 3"]
    assert failures == []


def test_retries_stop_at_max_attempts_and_the_failure_is_reported(tmp_path: Path) -> None:
    launcher, codes_file, failures = _launcher(tmp_path, "75 75 75 0", max_attempts=2)
    launcher.submit("run-2", 1)
    _wait_idle(launcher)
    assert len(Path(str(codes_file) + ".log").read_text().split()) == 4  # two attempts, two words each
    assert failures == [("run-2", "local job exited with 75")]


def test_permanent_exit_is_not_retried(tmp_path: Path) -> None:
    launcher, codes_file, failures = _launcher(tmp_path, "3 0")
    launcher.submit("run-3", 1)
    _wait_idle(launcher)
    assert Path(str(codes_file) + ".log").read_text() == "run-3 1\n"
    assert failures == [("run-3", "local job exited with 3")]
