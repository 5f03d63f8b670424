"""``python -m slidebridge`` against the running local stack, through the standard AWS_ENDPOINT_URL."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from local.stack import LOCAL_REGION, REPO_ROOT, StackProcess

pytestmark = pytest.mark.e2e

ORG = "e2e-cli-org"
CLI_TIMEOUT_S = 120
SECRET_QUERY = "X-Amz-Signature=e2e-cli-signature-0a1b"


def cli_environment(stack: StackProcess) -> dict[str, str]:
    """What an operator exports to reach the local stack: its moto endpoint and dummy credentials."""
    env = dict(stack.env)
    for name in list(env):
        if name.startswith("AWS_ENDPOINT_URL_") or name in {"AWS_PROFILE", "AWS_SESSION_TOKEN"}:
            del env[name]
    env.update(
        {
            "AWS_ENDPOINT_URL": stack.aws_endpoint_url,
            "AWS_DEFAULT_REGION": LOCAL_REGION,
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_EC2_METADATA_DISABLED": "true",
            "SLIDEBRIDGE_LAUNCHER": "process",
            "NO_PROXY": ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1", "localhost"])),
        }
    )
    return env


def slidebridge_cli(python: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-m", "slidebridge", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


@pytest.fixture
def stalled_download_url() -> Iterator[str]:
    """A loopback URL whose server accepts connections and never answers: the run's job waits there."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/patient-0815/slide.tiff?{SECRET_QUERY}"
    finally:
        server.close()  # resets the job's connection: it fails fast and finds its run cancelled


def _submit_stalled_run(client: httpx.Client, download_url: str, external_id: str) -> str:
    """A one-slide Platform run whose job will wait in the download; its run id."""
    submitted = client.post(
        "/api/v1/runs",
        json={
            "application_id": "he-tissue",
            "version_number": "1.0.0",
            "items": [
                {
                    "external_id": external_id,
                    "input_artifacts": [
                        {
                            "name": "whole_slide_image",
                            "download_url": download_url,
                            "metadata": {"checksum_base64_crc32c": "AAAAAA=="},
                        }
                    ],
                }
            ],
        },
    )
    assert submitted.status_code == 201, submitted.text
    run_id: str = submitted.json()["run_id"]
    return run_id


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def api(base_url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30, trust_env=False)


def test_operator_token_lifecycle_and_runs_against_the_local_stack(
    local_stack: StackProcess, venv_python: str, api_token: str, stalled_download_url: str
) -> None:
    env = cli_environment(local_stack)

    created = slidebridge_cli(venv_python, env, "tokens", "create", "--user", "e2e-operator", "--org", ORG)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert "cannot be recovered" in created.stderr

    with api(local_stack.url, token) as client:
        assert client.get("/api/v1/applications").status_code == 200
        run_id = _submit_stalled_run(client, stalled_download_url, "cli-e2e-slide")
    # The stack's own token belongs to another organisation: it cannot see this run.
    with api(local_stack.url, api_token) as other:
        assert other.get(f"/api/v1/runs/{run_id}").status_code == 404

    listed = slidebridge_cli(venv_python, env, "runs", "list", "--org", ORG, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(r["run_id"], r["source"], r["organization_id"]) for r in json.loads(listed.stdout)] == [
        (run_id, "platform", ORG)
    ]

    shown = slidebridge_cli(venv_python, env, "runs", "show", run_id)
    assert shown.returncode == 0, shown.stderr
    assert "cli-e2e-slide" in shown.stdout
    assert "from http://127.0.0.1:" in shown.stdout
    assert "X-Amz-Signature" not in shown.stdout and "patient-0815" not in shown.stdout

    cancelled = slidebridge_cli(venv_python, env, "runs", "cancel", run_id, "--reason", "e2e operator cancel")
    assert cancelled.returncode == 0, cancelled.stderr
    again = slidebridge_cli(venv_python, env, "runs", "cancel", run_id)
    assert again.returncode == 1
    assert "already ended" in again.stderr

    with api(local_stack.url, token) as client:
        run = client.get(f"/api/v1/runs/{run_id}").json()
    assert (run["state"], run["termination_reason"]) == ("TERMINATED", "CANCELED_BY_USER")

    tokens = slidebridge_cli(venv_python, env, "tokens", "list", "--org", ORG, "--json")
    assert tokens.returncode == 0, tokens.stderr
    [info] = json.loads(tokens.stdout)
    assert info["user_id"] == "e2e-operator"
    assert token not in tokens.stdout

    revoked = slidebridge_cli(venv_python, env, "tokens", "revoke", info["token_id"])
    assert revoked.returncode == 0, revoked.stderr
    with api(local_stack.url, token) as client:
        assert client.get("/api/v1/applications").status_code == 401
    with api(local_stack.url, api_token) as still_valid:
        assert still_valid.get("/api/v1/applications").status_code == 200


def test_cli_naming_a_missing_table_fails_with_exit_1(local_stack: StackProcess, venv_python: str) -> None:
    env = cli_environment(local_stack)
    env["SLIDEBRIDGE_TABLE_NAME"] = "no-such-table"

    result = slidebridge_cli(venv_python, env, "runs", "list")

    assert result.returncode == 1
    assert "no-such-table" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_job_stopped_by_a_cancel_removes_its_scratch_copy_of_the_slide(
    local_stack: StackProcess, api_token: str, stalled_download_url: str
) -> None:
    # Given a run whose job is inside the download, its scratch folder open
    with api(local_stack.url, api_token) as client:
        run_id = _submit_stalled_run(client, stalled_download_url, "scratch-e2e-slide")
        workdir = Path(local_stack.env["SLIDEBRIDGE_SCRATCH_DIR"]) / run_id / "0"
        _wait_for(workdir.exists, "the job to start downloading")

        # When the run is cancelled (the stack's launcher stops the job with SIGTERM, as Batch does)
        assert client.post(f"/api/v1/runs/{run_id}/cancel").status_code == 202

    # Then the job unwinds and removes what it had written (a slide can be GBs of scratch disk)
    _wait_for(lambda: not workdir.exists(), "the stopped job to remove its scratch folder")
