"""The whole stack on one machine: moto for AWS, the API Lambda behind a local gateway, jobs as processes.

``LocalStack`` runs in the calling process (``python -m local serve`` uses it): it starts a moto
server on a free loopback port, points this process's environment at it (boto3 reads
``AWS_ENDPOINT_URL`` natively, so the same slidebridge code runs unchanged), creates what the CDK
stack would (table, bucket, webhook-key secret, Batch queue and job definition), registers the
Platform API token and serves the API handler through :class:`local.gateway.Gateway`. Jobs run
through the ``ProcessLauncher`` as ``python -m batch_job RUN_ID`` children with the same
environment; the Batch resources exist only so that the same names resolve.

``StackProcess`` runs ``python -m local serve`` as a child process and waits for its ready line; the
demo and the end-to-end tests use it, so they see the stack exactly as an outside client would.

This module is a process entry point's helper: setting ``os.environ`` here is deliberate (DESIGN §2,
settings are read from the environment by every process, including the job subprocesses).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import boto3
from moto.server import ThreadedMotoServer

from local.gateway import Gateway, Handler
from local.moto_atomic import serialize_dynamodb_requests

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BUCKET_NAME",
    "DEFAULT_TABLE_NAME",
    "FIXED_KEY_VARIABLES",
    "LOCAL_REGION",
    "REPO_ROOT",
    "LocalStack",
    "StackProcess",
    "StackStartError",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_REGION = "eu-central-1"
LOCAL_USER_ID = "local-admin"
# The three values external tests may fix (DESIGN §7); random ones are generated when unset.
FIXED_KEY_VARIABLES = (
    "SLIDEBRIDGE_API_TOKEN",
    "SLIDEBRIDGE_SECTRA_WEBHOOK_KEY",
    "SLIDEBRIDGE_TECHCYTE_WEBHOOK_KEY",
)
DEFAULT_TABLE_NAME = "slidebridge"
DEFAULT_BUCKET_NAME = "slidebridge-data"
WEBHOOK_KEYS_SECRET_NAME = "slidebridge/webhook-keys"
_BATCH_SERVICE_ROLE = "slidebridge-local-batch-service"
_READY_PATTERN = re.compile(r"ready at (?P<url>http://\S+) \(AWS endpoint (?P<aws>http://\S+)\)")


class StackStartError(RuntimeError):
    """The local stack could not start (port taken, moto failed, child exited, no ready line)."""


# --- environment ----------------------------------------------------------------------------------


def configure_environment(aws_endpoint_url: str, data_dir: Path) -> None:
    """Point this process (and every child it starts) at the local AWS endpoint.

    User-set values of the fixed keys, table/bucket names, scratch dir and allowlists are kept;
    AWS credentials and endpoints are always replaced so nothing can reach a real account.
    """
    env = os.environ
    env["AWS_ENDPOINT_URL"] = aws_endpoint_url
    env["AWS_DEFAULT_REGION"] = LOCAL_REGION
    env["AWS_REGION"] = LOCAL_REGION
    env["AWS_ACCESS_KEY_ID"] = "local"  # moto accepts any credentials
    env["AWS_SECRET_ACCESS_KEY"] = "local"  # moto accepts any credentials
    # No instance-metadata lookups: the stack must start with loopback only (DESIGN §7).
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    for name in list(env):
        # A per-service endpoint (AWS_ENDPOINT_URL_S3, ...) or a profile would win over the above.
        if name.startswith("AWS_ENDPOINT_URL_") or name in {
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
        }:
            del env[name]

    # Loopback never goes through a proxy (boto3, httpx and the jobs all honour NO_PROXY).
    for name in ("NO_PROXY", "no_proxy"):
        entries = [e for e in env.get(name, "").split(",") if e.strip()]
        env[name] = ",".join(dict.fromkeys([*entries, "127.0.0.1", "localhost", "::1"]))

    for name in FIXED_KEY_VARIABLES:
        if not env.get(name):
            env[name] = secrets.token_urlsafe(32)
    env["SLIDEBRIDGE_LAUNCHER"] = "process"
    env.setdefault("SLIDEBRIDGE_TABLE_NAME", DEFAULT_TABLE_NAME)
    env.setdefault("SLIDEBRIDGE_BUCKET_NAME", DEFAULT_BUCKET_NAME)
    env.setdefault("SLIDEBRIDGE_SCRATCH_DIR", str(data_dir / "scratch"))
    env.setdefault("SLIDEBRIDGE_DOWNLOAD_HOSTS", "127.0.0.1,localhost")
    env.setdefault("SLIDEBRIDGE_SECTRA_CALLBACK_HOSTS", "127.0.0.1,localhost")
    # The job subprocesses run "python -m batch_job" from wherever the stack was started.
    paths = [str(REPO_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


# --- provisioning ---------------------------------------------------------------------------------


def _set_moto_config(aws_endpoint_url: str) -> None:
    # Batch jobs run through the ProcessLauncher, never in Docker; moto's simple Batch backend keeps
    # the resources without starting containers. Same for Lambda, should anything invoke one.
    request = urllib.request.Request(
        f"{aws_endpoint_url}/moto-api/config",
        data=json.dumps({"batch": {"use_docker": False}, "lambda": {"use_docker": False}}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def provision(
    *, table_name: str, bucket_name: str, job_queue: str, job_definition: str, webhook_keys: dict[str, str]
) -> None:
    """Create in moto what the CDK stack creates in AWS (names from settings)."""
    # Imported here: the store module reads nothing at import, but slidebridge must be importable
    # only once the environment points at moto (boto3 clients are created lazily anyway).
    from slidebridge.store import TABLE_DEFINITION, TTL_ATTRIBUTE  # noqa: PLC0415

    dynamodb = boto3.client("dynamodb")
    dynamodb.create_table(TableName=table_name, **TABLE_DEFINITION)
    dynamodb.get_waiter("table_exists").wait(TableName=table_name, WaiterConfig={"Delay": 0.1})
    dynamodb.update_time_to_live(
        TableName=table_name, TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE}
    )

    boto3.client("s3").create_bucket(Bucket=bucket_name, CreateBucketConfiguration={"LocationConstraint": LOCAL_REGION})

    # In AWS the Lambda reads the webhook keys from this secret; locally they also sit in the
    # environment (settings), the secret exists so that the same layout can be inspected and tested.
    boto3.client("secretsmanager").create_secret(
        Name=WEBHOOK_KEYS_SECRET_NAME,
        SecretString=json.dumps(webhook_keys),
    )

    role_arn = boto3.client("iam").create_role(
        RoleName=_BATCH_SERVICE_ROLE,
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "batch.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
        ),
    )["Role"]["Arn"]
    batch = boto3.client("batch")
    environment_arn = batch.create_compute_environment(
        computeEnvironmentName="slidebridge-local", type="UNMANAGED", state="ENABLED", serviceRole=role_arn
    )["computeEnvironmentArn"]
    batch.create_job_queue(
        jobQueueName=job_queue,
        state="ENABLED",
        priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": environment_arn}],
    )
    batch.register_job_definition(
        jobDefinitionName=job_definition,
        type="container",
        parameters={"run_id": "none"},
        containerProperties={
            "image": "slidebridge-job:local",
            "command": ["python", "-m", "batch_job", "Ref::run_id"],
            "resourceRequirements": [
                {"type": "VCPU", "value": "2"},
                {"type": "MEMORY", "value": "4096"},
            ],
        },
        # The same policy as the CDK job definition: retry on 75 (retryable), exit on 3 (permanent).
        retryStrategy={
            "attempts": 3,
            "evaluateOnExit": [
                {"onExitCode": "75", "action": "RETRY"},
                {"onExitCode": "3", "action": "EXIT"},
            ],
        },
    )


# --- the stack ------------------------------------------------------------------------------------


class LocalStack:
    """moto + gateway + API handler in this process; a context manager.

    ``host``/``port`` are the gateway's (port 0 picks a free one); ``data_dir`` holds scratch space
    for jobs (a temporary directory, removed on stop, when not given).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: Path | None = None,
        aws_port: int = 0,
    ) -> None:
        self._host = host
        self._port = port
        self._aws_port = aws_port
        self._given_data_dir = data_dir
        self._data_dir: Path | None = None
        self._moto: ThreadedMotoServer | None = None
        self._gateway: Gateway | None = None
        self._sweeper: _DeadlineSweeper | None = None
        self.aws_endpoint_url = ""

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        if self._given_data_dir is not None:
            self._given_data_dir.mkdir(parents=True, exist_ok=True)
            self._data_dir = self._given_data_dir
        else:
            self._data_dir = Path(tempfile.mkdtemp(prefix="slidebridge-local-"))

        # werkzeug (moto's server) logs every AWS call at INFO; the gateway's access log is enough.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        logging.getLogger("botocore").setLevel(logging.WARNING)
        serialize_dynamodb_requests()
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self._aws_port, verbose=False)
        self._moto.start()
        aws_host, aws_port = self._moto.get_host_and_port()
        self.aws_endpoint_url = f"http://{aws_host}:{aws_port}"
        configure_environment(self.aws_endpoint_url, self._data_dir)
        _set_moto_config(self.aws_endpoint_url)

        # Imported only now: settings are read from the environment configured above.
        from slidebridge.settings import get_settings  # noqa: PLC0415
        from slidebridge.store import RunStore  # noqa: PLC0415

        get_settings.cache_clear()
        settings = get_settings()
        settings.scratch_dir.mkdir(parents=True, exist_ok=True)
        provision(
            table_name=settings.table_name,
            bucket_name=settings.bucket_name,
            job_queue=settings.job_queue,
            job_definition=settings.job_definition,
            webhook_keys={"sectra": self.sectra_webhook_key, "techcyte": self.techcyte_webhook_key},
        )
        RunStore(settings.table_name).register_api_token(
            self.api_token, user_id=LOCAL_USER_ID, organization_id=settings.default_organization_id
        )

        self._gateway = Gateway(_load_handler(), host=self._host, port=self._port)
        self._gateway.start()
        self._sweeper = _DeadlineSweeper(settings.deadline_sweep_interval_s)
        self._sweeper.start()
        logger.info("gateway at %s, AWS (moto) at %s", self._gateway.url, self.aws_endpoint_url)

    def stop(self) -> None:
        """Stop serving, end running jobs, stop moto, remove the temporary data dir; idempotent."""
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
        if self._gateway is not None:
            self._gateway.stop()
            self._gateway = None
        _terminate_jobs()
        if self._moto is not None:
            self._moto.stop()
            self._moto = None
        if self._data_dir is not None and self._given_data_dir is None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
        self._data_dir = None

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- what clients need ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._gateway is None:
            raise StackStartError("the local stack is not running")
        return self._gateway.url

    @property
    def api_token(self) -> str:
        return os.environ["SLIDEBRIDGE_API_TOKEN"]

    @property
    def sectra_webhook_key(self) -> str:
        return os.environ["SLIDEBRIDGE_SECTRA_WEBHOOK_KEY"]

    @property
    def techcyte_webhook_key(self) -> str:
        return os.environ["SLIDEBRIDGE_TECHCYTE_WEBHOOK_KEY"]

    def ready_line(self) -> str:
        """The line ``python -m local serve`` prints once requests are accepted (DESIGN §7)."""
        return f"slidebridge local stack ready at {self.url} (AWS endpoint {self.aws_endpoint_url})"


class _DeadlineSweeper:
    """Plays the EventBridge schedule that calls the ``scheduler`` Lambda in AWS: every ``interval_s``
    it cancels the runs past their deadline (``slidebridge.scheduling.cancel_overdue_runs``), with
    the same ProcessLauncher as the API, so that it stops their job processes."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="deadline-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        from slidebridge.launcher import launcher_from_settings  # noqa: PLC0415 - after the environment is set
        from slidebridge.scheduling import cancel_overdue_runs, close_unlaunched_runs  # noqa: PLC0415
        from slidebridge.settings import get_settings  # noqa: PLC0415
        from slidebridge.store import RunStore  # noqa: PLC0415

        settings = get_settings()
        store = RunStore(settings.table_name)
        launcher = launcher_from_settings(settings)
        while not self._stop.wait(self._interval_s):
            try:
                cancel_overdue_runs(store, launcher, settings=settings)
                close_unlaunched_runs(store, settings)
            except Exception:
                logger.exception("deadline sweep failed; trying again in %.0f s", self._interval_s)


def _load_handler() -> Handler:
    # Imported after the environment is configured: the handler module builds its collaborators
    # from settings on first use.
    from lambdas.api.handler import handler  # noqa: PLC0415

    # The handler's decorators (Powertools tracer, metrics) are untyped: state what it is.
    typed: Handler = handler
    return typed


def _terminate_jobs() -> None:
    """End the ``python -m batch_job`` children this process started (and their tile workers)."""
    from slidebridge.launcher import ProcessLauncher, launcher_from_settings  # noqa: PLC0415
    from slidebridge.settings import get_settings  # noqa: PLC0415

    if os.environ.get("SLIDEBRIDGE_LAUNCHER") != "process":
        return  # never started: the environment was not configured
    launcher = launcher_from_settings(get_settings())
    if isinstance(launcher, ProcessLauncher):
        launcher.terminate_all()


# --- the stack as a child process -----------------------------------------------------------------


@dataclass(frozen=True)
class StackEndpoints:
    url: str
    aws_endpoint_url: str


class StackProcess:
    """``python -m local serve`` as a child process, for the demo and the end-to-end tests.

    Its output goes to ``log_path`` (a file, so a chatty stack can never block on a full pipe); the
    ready line is read from there. ``env`` is the child's whole environment.
    """

    def __init__(
        self,
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        python: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self._python = python or sys.executable
        self._host = host
        self._port = port
        self._start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.endpoints: StackEndpoints | None = None

    @property
    def url(self) -> str:
        if self.endpoints is None:
            raise StackStartError("the local stack is not running")
        return self.endpoints.url

    @property
    def aws_endpoint_url(self) -> str:
        if self.endpoints is None:
            raise StackStartError("the local stack is not running")
        return self.endpoints.aws_endpoint_url

    @property
    def pid(self) -> int:
        if self._process is None:
            raise StackStartError("the local stack is not running")
        return self._process.pid

    def start(self) -> StackEndpoints:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen(
            [self._python, "-m", "local", "serve", "--host", self._host, "--port", str(self._port)],
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            match = _READY_PATTERN.search(self.log_path.read_text(errors="replace"))
            if match:
                self.endpoints = StackEndpoints(url=match["url"], aws_endpoint_url=match["aws"])
                return self.endpoints
            if self._process.poll() is not None:
                break
            time.sleep(0.1)
        code = self._process.poll()
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-4000:]
        reason = f"exited with {code}" if code is not None else f"not ready after {self._start_timeout_s:.0f} s"
        raise StackStartError(f"python -m local serve {reason}; its log ({self.log_path}) ends:\n{tail}")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait, SIGKILL as a last resort; returns the exit code."""
        code: int | None = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGTERM)
            try:
                code = self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.error("local stack pid %d ignored SIGTERM; killing it", self._process.pid)
                self._process.kill()
                code = self._process.wait()
            self._process = None
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
        self.endpoints = None
        return code

    def __enter__(self) -> StackProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def aws_client(self, service: str, **kwargs: Any) -> Any:
        """A boto3 client for the stack's moto endpoint (dummy credentials, the local region)."""
        return boto3.client(
            service,
            endpoint_url=self.aws_endpoint_url,
            region_name=LOCAL_REGION,
            aws_access_key_id="local",
            aws_secret_access_key="local",  # moto accepts any credentials
            **kwargs,
        )
