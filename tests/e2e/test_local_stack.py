"""``python -m local serve`` as outside tests drive it: ready line, answers, limits, clean stop."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local.stack import REPO_ROOT, StackProcess

pytestmark = pytest.mark.e2e

READY_URL = re.compile(r"ready\b.*?(http://[\w.\[\]:-]+)")
START_TIMEOUT_S = 120


def read_until_ready(process: subprocess.Popen[bytes]) -> tuple[str, str]:
    """Read the child's stdout until a line contains 'ready'; returns (base URL, output so far)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    output = b""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        readable, _, _ = select.select([fd], [], [], 0.5)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            output += chunk
            for line in output.decode(errors="replace").splitlines():
                match = READY_URL.search(line)
                if match:
                    return match.group(1), output.decode(errors="replace")
    process.kill()
    raise AssertionError(f"no ready line; output:\n{output.decode(errors='replace')[-3000:]}")


@pytest.fixture
def serve(venv_python: str, stack_env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """The stack with stdout/stderr on a pipe that the test reads only until the ready line."""
    process = subprocess.Popen(
        [venv_python, "-m", "local", "serve", "--host", "127.0.0.1", "--port", "0"],
        cwd=REPO_ROOT,
        env=stack_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def client(base_url: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=30, trust_env=False)


def test_serve_prints_ready_answers_and_stops_on_sigterm(serve: subprocess.Popen[bytes], api_token: str) -> None:
    base_url, _ = read_until_ready(serve)

    with client(base_url, api_token) as authorised:
        response = authorised.get("/api/v1/applications")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert "he-tissue" in [app["application_id"] for app in response.json()]

    with client(base_url, token=None) as anonymous:
        assert anonymous.get("/api/v1/applications").status_code == 401
    with client(base_url, token="not-the-token") as wrong:
        assert wrong.get("/api/v1/applications").status_code == 401
        assert wrong.post("/api/v1/runs", json={"application_id": "he-tissue"}).status_code == 401

    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=60) == 0


def test_sigint_stops_cleanly(serve: subprocess.Popen[bytes], api_token: str) -> None:
    base_url, _ = read_until_ready(serve)

    serve.send_signal(signal.SIGINT)

    assert serve.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError), client(base_url, api_token) as gone:
        gone.get("/api/v1/applications")


def test_stack_keeps_answering_when_nobody_reads_its_output(serve: subprocess.Popen[bytes], api_token: str) -> None:
    # An outside test may read stdout only until the ready line. Each request below logs a ~4 KB
    # access line: far more than a pipe buffer (64 KiB) once nobody drains it.
    base_url, _ = read_until_ready(serve)
    long_path = "/api/v1/" + "x" * 4000

    with client(base_url, api_token) as authorised:
        statuses = {authorised.get(long_path).status_code for _ in range(40)}
        final = authorised.get("/api/v1/applications")

    assert statuses == {404}
    assert final.status_code == 200
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=60) == 0


def test_port_in_use_fails_with_a_message(tmp_path: Path, venv_python: str, stack_env: dict[str, str]) -> None:
    with StackProcess(tmp_path / "first.log", env=stack_env, python=venv_python) as first:
        port = int(first.url.rsplit(":", 1)[1])
        result = subprocess.run(
            [venv_python, "-m", "local", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=stack_env,
            capture_output=True,
            timeout=120,
            check=False,
        )
    assert result.returncode != 0
    assert b"ready" not in result.stdout
    assert b"failed to start" in result.stderr


# --- gateway limits through the real stack -------------------------------------------------------------


def test_body_over_10_mb_gets_413(local_stack: StackProcess, api_token: str) -> None:
    with client(local_stack.url, api_token) as authorised:
        response = authorised.post(
            "/api/v1/runs",
            content=b"{" + b" " * (10 * 1024 * 1024) + b"}",
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"\xff\xfe\x00binary", "application/octet-stream"),
        (b"[1, 2, 3]", "application/json"),
        (b'{"application_id": 5, "items": "none"}', "application/json"),
        (b"", "application/json"),
    ],
)
def test_unparseable_run_requests_get_4xx(
    local_stack: StackProcess, api_token: str, content: bytes, content_type: str
) -> None:
    with client(local_stack.url, api_token) as authorised:
        response = authorised.post("/api/v1/runs", content=content, headers={"Content-Type": content_type})
    assert 400 <= response.status_code < 500, response.text
    assert "detail" in response.json()


def test_unknown_route_is_404_json(local_stack: StackProcess, api_token: str) -> None:
    with client(local_stack.url, api_token) as authorised:
        response = authorised.get("/api/v1/no-such-thing")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
