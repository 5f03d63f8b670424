"""End-to-end fixtures: ``python -m local serve`` as a child process, driven over loopback HTTP only."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from local.demo import DemoError, PlatformClient, SlideFile, cached_synthetic_slide, stack_environment
from local.demo_techcyte import techcyte_stack_environment
from local.fake_techcyte import FakeTechcyte
from local.stack import REPO_ROOT, StackProcess

# The contract names the project's venv interpreter (DESIGN §7); fall back to ours elsewhere.
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable

# Fixed values, as outside tests set them (DESIGN §7 "fixed keys for tests").
API_TOKEN = "e2e-platform-token-5f0c2a"
SECTRA_KEY = "e2e-sectra-key-91d3"
TECHCYTE_KEY = "e2e-techcyte-key-4b7e"

# Generous (the first job pays for importing torch; the machine is shared), but below pytest-timeout
# so that a stuck run fails with the stack log attached.
RUN_TIMEOUT_S = 480.0


def e2e_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SLIDEBRIDGE_API_TOKEN": API_TOKEN,
            "SLIDEBRIDGE_SECTRA_WEBHOOK_KEY": SECTRA_KEY,
            "SLIDEBRIDGE_TECHCYTE_WEBHOOK_KEY": TECHCYTE_KEY,
        }
    )
    # A stray endpoint or profile from the developer's shell must not leak into the stack.
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        env.pop(name, None)
    return stack_environment(env)


@pytest.fixture
def stack_env() -> dict[str, str]:
    """The environment for a ``python -m local serve`` child, with the fixed test keys."""
    return e2e_environment()


@pytest.fixture(scope="session")
def api_token() -> str:
    return API_TOKEN


@pytest.fixture(scope="session")
def venv_python() -> str:
    return PYTHON


@pytest.fixture(scope="session")
def techcyte_fake() -> Iterator[FakeTechcyte]:
    """The fake Techcyte API on loopback, started before the session's stack, which posts results to it."""
    with FakeTechcyte(client_id="e2e-techcyte-client", client_secret="e2e-techcyte-secret-2d81") as fake:
        yield fake


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory, techcyte_fake: FakeTechcyte) -> Iterator[StackProcess]:
    """One local stack for the session (port 0: a free port), stopped with SIGTERM at the end."""
    log = tmp_path_factory.mktemp("stack") / "local-stack.log"
    env = {**e2e_environment(), **techcyte_stack_environment(techcyte_fake)}
    # Known to the tests, which check that a stopped job leaves nothing behind there.
    env["SLIDEBRIDGE_SCRATCH_DIR"] = str(tmp_path_factory.mktemp("scratch"))
    stack = StackProcess(log, env=env, python=PYTHON)
    stack.start()
    try:
        yield stack
    finally:
        code = stack.stop()
        # A stack that cannot stop cleanly is a failure too; say where its log is.
        assert code == 0, f"the local stack exited with {code}; log: {log}"


@pytest.fixture(scope="session")
def platform(local_stack: StackProcess) -> Iterator[PlatformClient]:
    with PlatformClient(local_stack.url, API_TOKEN) as client:
        yield client


@pytest.fixture(scope="session")
def s3(local_stack: StackProcess) -> Any:
    return local_stack.aws_client("s3")


@pytest.fixture(scope="session")
def bucket(local_stack: StackProcess) -> str:
    return local_stack.env["SLIDEBRIDGE_BUCKET_NAME"]


@pytest.fixture(scope="session")
def slide_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def slide_8k(slide_cache: Path) -> SlideFile:
    """An 8000 × 8000 px H&E-like pyramidal TIFF (0.25 µm/px): big enough for a real tile grid."""
    return cached_synthetic_slide(slide_cache, 8000, 8000)


@pytest.fixture(scope="session")
def slide_small(slide_cache: Path) -> SlideFile:
    """A 2048 × 2048 px slide for runs that must fail before the analysis starts."""
    return cached_synthetic_slide(slide_cache, 2048, 2048, seed=1)


RunAndItems = tuple[dict[str, Any], list[dict[str, Any]]]


@pytest.fixture(scope="session")
def stack_log(local_stack: StackProcess) -> Callable[[], str]:
    """The end of the stack's log (its jobs' output included), for assertion messages."""

    def tail(chars: int = 4000) -> str:
        try:
            return "--- local stack log ---\n" + local_stack.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no local stack log)"

    return tail


@pytest.fixture(scope="session")
def wait_for_run(platform: PlatformClient, stack_log: Callable[[], str]) -> Callable[[str], RunAndItems]:
    """Poll a run until TERMINATED; a run that never ends fails with the stack's log attached."""

    def wait(run_id: str) -> RunAndItems:
        try:
            return platform.wait_for_run(run_id, timeout_s=RUN_TIMEOUT_S, poll_s=1.0)
        except DemoError as exc:
            raise AssertionError(f"{exc}\n{stack_log()}") from exc

    return wait
