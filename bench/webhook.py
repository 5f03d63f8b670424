"""Vendor webhooks in process: the ``api`` Lambda handler (ours) against the same routes in FastAPI (baseline).

    python -m bench.webhook [--requests 500] [--warmup 20] [--import-runs 7] [--cold-runs 7] [--ours-tree DIR]

Three figures, each for both apps:

- **cold import**: ``import lambdas.api.handler`` (ours) and ``import bench.webhook_fastapi`` (the
  baseline) in a fresh interpreter, timed inside it (interpreter start-up excluded), median of
  ``--import-runs``, after one untimed run that leaves the bytecode cache warm. Outside Lambda, as the
  local stack and the tests run it; ours is also timed with ``LAMBDA_TASK_ROOT`` set, where tracing is on
  and the X-Ray SDK loads at import (printed, not compared).
- **cold start**: import + the first request, in a fresh interpreter against a moto server on
  127.0.0.1 (so boto3 and botocore load inside the measurement, as in Lambda): a Techcyte webhook for
  both apps, and a Platform ``GET /api/v1/runs`` for ours; ours' Techcyte webhook also as in Lambda,
  tracing on, its segments sent to a stand-in daemon (printed, not compared). Median of
  ``--cold-runs``. This is where work moved out of the import shows up again; the moto server's own
  time is included (a few ms).
- **per request**, p50 and p99 over ``--requests`` requests after ``--warmup``: a Sectra ``create``
  (each for a new slide), the same ``create`` again (the idempotent path: one read, no Sectra call)
  and a Techcyte webhook (each a new task). Both apps run in this process, driven directly: ours as
  Lambda calls it (an API Gateway REST proxy event through the decorated handler, metrics and log
  lines included, to /dev/null), the baseline as an ASGI server calls it (scope, receive, send; its
  sync routes run in Starlette's thread pool, as in production). They share one moto (in process)
  and one Sectra stand-in, and alternate in blocks of 25 requests in ABBA order so that drift on a
  shared machine hits both.

Our own time is the request's wall time minus the peers' time:

- **Sectra**: the ``MockSectraServer`` of sectra_client (the one the integration tests use) in its
  own process on 127.0.0.1, so its work never competes with ours for the GIL. Each round trip is timed around
  ``httpx.HTTPTransport.handle_request`` (connect, send, Sectra's handling, the response with its
  body) and subtracted; building the client, the URL policy checks and parsing the answer stay ours.
- **AWS**: moto in process. Its service side (``BotocoreStubber.process_request``: routing and the
  fake DynamoDB/Batch backends) is timed and subtracted; botocore's client side (serialising,
  signing, parsing), which Lambda pays against real AWS too, stays ours. No AWS call leaves the process.

Totals (wall time, peers included) are printed too. The webhook keys come from the environment, as
in the local stack (in AWS they are a Secrets Manager read, cached for five minutes).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import math
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol
from unittest import mock

from bench import BenchRow

REPO = Path(__file__).resolve().parent.parent
APPS = ("baseline", "ours")
SCENARIOS = ("sectra create", "sectra create again", "techcyte webhook")
OURS_MODULE = "lambdas.api.handler"
# Ours as in Lambda: LAMBDA_TASK_ROOT set, so tracing is on and the X-Ray SDK loads (printed, not compared).
OURS_TRACED = "ours, tracing on (Lambda)"
BASELINE_MODULE = "bench.webhook_fastapi"
BLOCK = 25  # requests per app in a row; blocks alternate ABBA

SECTRA_KEY = "bench-sectra-key-5b1e"
TECHCYTE_KEY = "bench-techcyte-key-9c2d"
SECTRA_TOKEN = "bench-sectra-callback-token"
API_TOKEN = "bench-platform-api-token-0123456789"
TASK_JWT = "eyJhbGciOiJIUzI1NiJ9.eyJ0YXNrIjoxfQ.YmVuY2g"  # shaped like a Techcyte task JWT; signs nothing
APPLICATION = "he-tissue"
REGION = "eu-central-1"
TABLE = "slidebridge-bench"
BUCKET = "slidebridge-bench-data"
JOB_QUEUE = "slidebridge-bench-gpu"
JOB_DEFINITION = "slidebridge-bench-job"
DOWNLOAD_HOST = "bucket.s3.us-west-2.amazonaws.com"
RESULT_MARK = "BENCH-RESULT "


class BenchFailedError(RuntimeError):
    """A request answered something other than what the benchmark expects: its timing would mean nothing."""


# --- environment -------------------------------------------------------------------------------


def bench_environment(aws_endpoint_url: str | None = None) -> dict[str, str | None]:
    """Every variable both apps read (None: unset). ``aws_endpoint_url``: a moto server, else moto in process."""
    return {
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE": None,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": aws_endpoint_url,
        "NO_PROXY": "127.0.0.1,localhost",
        # Outside Lambda, as the local stack and the tests run the handler: tracing is off.
        "LAMBDA_TASK_ROOT": None,
        "POWERTOOLS_SERVICE_NAME": "slidebridge-bench",
        "SLIDEBRIDGE_TABLE_NAME": TABLE,
        "SLIDEBRIDGE_BUCKET_NAME": BUCKET,
        "SLIDEBRIDGE_LAUNCHER": "batch",
        "SLIDEBRIDGE_JOB_QUEUE": JOB_QUEUE,
        "SLIDEBRIDGE_JOB_DEFINITION": JOB_DEFINITION,
        "SLIDEBRIDGE_SECTRA_WEBHOOK_KEY": SECTRA_KEY,
        "SLIDEBRIDGE_TECHCYTE_WEBHOOK_KEY": TECHCYTE_KEY,
        "SLIDEBRIDGE_SECTRA_CALLBACK_HOSTS": "127.0.0.1",
        "SLIDEBRIDGE_DOWNLOAD_HOSTS": DOWNLOAD_HOST,
    }


@contextlib.contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """``values`` in ``os.environ`` (every other ``SLIDEBRIDGE_*`` removed), restored afterwards."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("SLIDEBRIDGE_")]:
        del os.environ[name]
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def provision() -> None:
    """What the stack creates, in whatever AWS the environment points at (moto), plus an API token."""
    from local.stack import provision as provision_stack  # noqa: PLC0415 - heavy; only when run
    from slidebridge.settings import get_settings  # noqa: PLC0415
    from slidebridge.store import RunStore  # noqa: PLC0415

    get_settings.cache_clear()
    provision_stack(
        table_name=TABLE,
        bucket_name=BUCKET,
        job_queue=JOB_QUEUE,
        job_definition=JOB_DEFINITION,
        webhook_keys={"sectra": SECTRA_KEY, "techcyte": TECHCYTE_KEY},
    )
    RunStore(TABLE).register_api_token(
        API_TOKEN, user_id="bench", organization_id=get_settings().default_organization_id
    )


# --- requests ----------------------------------------------------------------------------------


def sectra_create(callback_url: str, name: str) -> dict[str, Any]:
    """A Sectra ``create`` invocation for a slide of its own (the stand-in makes up its metadata)."""
    return {
        "action": "create",
        "applicationId": APPLICATION,
        "slideId": f"bench-slide-{name}",
        "callbackInfo": {"url": callback_url, "token": SECTRA_TOKEN},
        "context": {"site": "bench"},
        "cancellationToken": f"bench-cancel-{name}",
        "input": {"type": "wholeSlide"},
    }


def techcyte_webhook(task: int) -> dict[str, Any]:
    """A Techcyte webhook for task ``task`` (its global id, as Techcyte sends it) with one scan."""
    scan = str(5_000_000 + task)
    url = f"https://{DOWNLOAD_HOST}/files_uuid/{scan}.svs?X-Amz-Signature=bench{task}"
    return {
        "company_id": "1001",
        "task_id": base64.b64encode(f"task:{task}".encode()).decode(),
        "case_id": base64.b64encode(f"humanCase:{task}".encode()).decode(),
        "scans": {scan: url},
        "scan_urls": {scan: [url]},
        "stains": {scan: {"value": "HE", "stain_code": "HE", "label": "H&E"}},
        "model_name": "",
        "jwt_token": TASK_JWT,
    }


def rest_event(method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An API Gateway REST proxy event, as the ``api`` Lambda receives it."""
    all_headers = {
        "Accept": "application/json",
        "Host": "abc123.execute-api.eu-central-1.amazonaws.com",
        "User-Agent": "slidebridge-bench",
        "X-Forwarded-For": "203.0.113.10",
        "X-Forwarded-Proto": "https",
        **({"Content-Type": "application/json"} if body is not None else {}),
        **(headers or {}),
    }
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": all_headers,
        "multiValueHeaders": {name: [value] for name, value in all_headers.items()},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": {"proxy": path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc123",
            "resourceId": "xyz",
            "resourcePath": "/{proxy+}",
            "httpMethod": method,
            "path": "/prod" + path,
            "stage": "prod",
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "requestTimeEpoch": 1790000000000,
            "protocol": "HTTP/1.1",
            "identity": {"sourceIp": "203.0.113.10", "userAgent": "slidebridge-bench"},
        },
        "body": body.decode() if body is not None else None,
        "isBase64Encoded": False,
    }


def asgi_scope(method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ASGI HTTP scope a server would build for the same request."""
    all_headers = {
        "host": "api.example.org",
        "accept": "application/json",
        "user-agent": "slidebridge-bench",
        **({"content-type": "application/json", "content-length": str(len(body))} if body is not None else {}),
        **{name.lower(): value for name, value in (headers or {}).items()},
    }
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.encode(), value.encode()) for name, value in all_headers.items()],
        "client": ("203.0.113.10", 50000),
        "server": ("api.example.org", 443),
    }


# --- the two apps, driven in process -----------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # the JSON answer; None for an empty body
    headers: dict[str, str]  # names in lower case


class App(Protocol):
    name: str

    def call(self, method: str, path: str, body: bytes | None) -> Reply: ...


class LambdaContext:
    """What the Lambda runtime passes as ``context`` (the fields Powertools reads)."""

    function_name = "slidebridge-api"
    memory_limit_in_mb = 1024
    invoked_function_arn = "arn:aws:lambda:eu-central-1:123456789012:function:slidebridge-api"
    aws_request_id = "bench-request"

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 29_000


class Ours:
    """The ``api`` Lambda handler, called as the Lambda runtime calls it."""

    name = "ours"

    def __init__(self) -> None:
        from lambdas.api.handler import handler  # noqa: PLC0415 - after the environment is set

        self._handler: Callable[[dict[str, Any], Any], dict[str, Any]] = handler

    def call(self, method: str, path: str, body: bytes | None) -> Reply:
        response = self._handler(rest_event(method, path, body), LambdaContext())
        headers = {name.lower(): str(value) for name, value in (response.get("headers") or {}).items()}
        for name, values in (response.get("multiValueHeaders") or {}).items():
            headers[name.lower()] = ", ".join(str(v) for v in values)
        raw = response.get("body")
        return Reply(int(response["statusCode"]), json.loads(raw) if raw else None, headers)


async def asgi_call(app: Any, method: str, path: str, body: bytes | None) -> Reply:
    """One request through an ASGI app, as an ASGI server makes it (no socket)."""
    import asyncio  # noqa: PLC0415

    answered = asyncio.Event()
    body_sent = False
    status = 0
    headers: dict[str, str] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body or b"", "more_body": False}
        await answered.wait()  # the client stays until the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers.update((k.decode().lower(), v.decode()) for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    await app(asgi_scope(method, path, body), receive, send)
    raw = b"".join(chunks)
    return Reply(status, json.loads(raw) if raw else None, headers)


class Baseline:
    """The FastAPI app (``bench.webhook_fastapi``) on one event loop, as uvicorn would run it."""

    name = "baseline"

    def __init__(self) -> None:
        import asyncio  # noqa: PLC0415

        from bench.webhook_fastapi import app  # noqa: PLC0415 - after the environment is set

        self._app = app
        self._loop = asyncio.new_event_loop()

    def call(self, method: str, path: str, body: bytes | None) -> Reply:
        return self._loop.run_until_complete(asgi_call(self._app, method, path, body))

    def close(self) -> None:
        self._loop.close()


# --- the Sectra stand-in -----------------------------------------------------------------------


@contextlib.contextmanager
def _mock_sectra() -> Iterator[str]:
    """sectra_client's ``MockSectraServer`` app (its routes and state) under uvicorn on 127.0.0.1.

    Not ``MockSectraServer.run``: that hands uvicorn a file descriptor, which uvicorn opens as a Unix
    socket, so asyncio leaves Nagle's algorithm on and each answer on a kept-alive connection waits
    ~40 ms for a delayed ACK (excluded from our time, but it made the run minutes longer). A socket
    passed as a socket gets TCP_NODELAY as usual.
    """
    import uvicorn  # noqa: PLC0415
    from sectra_client.mock_server import MockSectraServer  # noqa: PLC0415

    mock = MockSectraServer(token=SECTRA_TOKEN)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(mock.create_app(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise BenchFailedError("the Sectra stand-in did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _serve_sectra(conn: Connection) -> None:
    with _mock_sectra() as url:
        conn.send(url)
        with contextlib.suppress(EOFError):
            conn.recv()  # until the benchmark is done (or gone)


@contextlib.contextmanager
def sectra_stand_in(*, isolate: bool = True) -> Iterator[str]:
    """The Sectra stand-in (:func:`_mock_sectra`); yields its URL.

    ``isolate``: in a process of its own (so that it never holds our GIL); else in a thread here
    (quick tests).
    """
    if not isolate:
        with _mock_sectra() as url:
            yield url
        return
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_serve_sectra, args=(theirs,), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + 60
        while not ours.poll(0.1):
            if not process.is_alive() or time.monotonic() > deadline:
                raise BenchFailedError("the Sectra stand-in did not start (run the benchmark as __main__)")
        yield str(ours.recv())
    finally:
        with contextlib.suppress(OSError):
            ours.send("stop")
        process.join(10)
        if process.is_alive():
            process.kill()


# --- the peers' time ---------------------------------------------------------------------------


@dataclass
class PeerTime:
    """Time the current request spent in its peers: Sectra round trips and moto's service side."""

    sectra_ns: int = 0
    aws_ns: int = 0
    sectra_calls: int = 0
    aws_calls: int = 0

    def reset(self) -> None:
        self.sectra_ns = self.aws_ns = self.sectra_calls = self.aws_calls = 0


@contextlib.contextmanager
def timing_peers() -> Iterator[PeerTime]:
    """Time every Sectra round trip and every moto request handling while the context is open."""
    import httpx  # noqa: PLC0415
    from moto.core.botocore_stubber import BotocoreStubber  # noqa: PLC0415

    peers = PeerTime()
    send = httpx.HTTPTransport.handle_request
    handle = BotocoreStubber.process_request

    def timed_send(transport: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter_ns()
        try:
            response = send(transport, request)
            # The body too: waiting for its bytes is Sectra's time (httpx would read it just after).
            response.read()
            return response
        finally:
            peers.sectra_ns += time.perf_counter_ns() - started
            peers.sectra_calls += 1

    def timed_handle(stubber: BotocoreStubber, request: Any) -> Any:
        started = time.perf_counter_ns()
        try:
            return handle(stubber, request)
        finally:
            peers.aws_ns += time.perf_counter_ns() - started
            peers.aws_calls += 1

    with (
        mock.patch.object(httpx.HTTPTransport, "handle_request", timed_send),
        mock.patch.object(BotocoreStubber, "process_request", timed_handle),
    ):
        yield peers


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """Metrics (EMF on stdout) and log lines go to /dev/null, as cheaply as to Lambda's log pipe."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        # Powertools' Logger holds the stdout it found at import: point its handlers at the sink too.
        handlers = [h for h in logging.getLogger("slidebridge").handlers if isinstance(h, logging.StreamHandler)]
        streams = [h.setStream(sink) for h in handlers]
        try:
            yield
        finally:
            for handler, stream in zip(handlers, streams, strict=True):
                if stream is not None:
                    handler.setStream(stream)


# --- per-request measurement -------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    app: str
    scenario: str
    total_ns: int
    sectra_ns: int
    aws_ns: int
    sectra_calls: int
    aws_calls: int

    @property
    def ours_ns(self) -> int:
        return self.total_ns - self.sectra_ns - self.aws_ns


@dataclass
class Traffic:
    """The requests one app is sent: new slides and new tasks of its own."""

    app: str
    callback_url: str
    task_base: int
    sent: int = 0

    def requests(self, scenario: str, count: int) -> list[tuple[str, bytes]]:
        """``count`` requests; for ``sectra create again``, creates that :func:`run_block` sends twice."""
        batch = []
        for _ in range(count):
            self.sent += 1
            if scenario in ("sectra create", "sectra create again"):
                body = sectra_create(self.callback_url, f"{self.app}-{self.sent}")
                batch.append((f"/hooks/sectra/{SECTRA_KEY}", json.dumps(body).encode()))
            elif scenario == "techcyte webhook":
                body = techcyte_webhook(self.task_base + self.sent)
                batch.append((f"/hooks/techcyte/{TECHCYTE_KEY}", json.dumps(body).encode()))
            else:
                raise ValueError(f"unknown scenario {scenario!r}")
        return batch


def measure(app: App, peers: PeerTime, scenario: str, path: str, body: bytes) -> Sample:
    peers.reset()
    started = time.perf_counter_ns()
    reply = app.call("POST", path, body)
    total = time.perf_counter_ns() - started
    if reply.status != 200:
        raise BenchFailedError(f"{app.name}, {scenario}: HTTP {reply.status} {reply.body!r}")
    return Sample(app.name, scenario, total, peers.sectra_ns, peers.aws_ns, peers.sectra_calls, peers.aws_calls)


def run_block(app: App, traffic: Traffic, peers: PeerTime, scenario: str, count: int) -> list[Sample]:
    """``count`` requests of ``scenario`` to ``app``, each measured."""
    requests = traffic.requests(scenario, count)
    if scenario == "sectra create again":
        for path, body in requests:  # the first create of each, not measured
            measure(app, peers, scenario, path, body)
    return [measure(app, peers, scenario, path, body) for path, body in requests]


def fresh_table() -> None:
    """An empty run table. moto copies every table on each transactional write (its rollback), so
    its time grows with the table, and so do its garbage-collector pauses, which can land in our
    code: each block starts empty (real DynamoDB does not slow down as a table grows)."""
    import boto3  # noqa: PLC0415

    from slidebridge.store import TABLE_DEFINITION  # noqa: PLC0415

    dynamodb = boto3.client("dynamodb")
    dynamodb.delete_table(TableName=TABLE)
    dynamodb.create_table(TableName=TABLE, **TABLE_DEFINITION)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (defined for any number of values)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def run_requests(requests: int = 500, warmup: int = 20, *, isolate: bool = True, echo: bool = False) -> list[Sample]:
    """Both apps, every scenario; moto in process and the Sectra stand-in on 127.0.0.1."""
    from moto import mock_aws  # noqa: PLC0415

    from lambdas.api import deps  # noqa: PLC0415

    with (
        environment(bench_environment()),
        mock_aws(config={"batch": {"use_docker": False}}),
        sectra_stand_in(isolate=isolate) as sectra_url,
    ):
        provision()
        deps.reset()
        baseline = Baseline()
        apps: dict[str, App] = {"baseline": baseline, "ours": Ours()}
        traffic = {name: Traffic(name, sectra_url, task_base=(i + 1) * 1_000_000) for i, name in enumerate(APPS)}
        samples: list[Sample] = []
        try:
            with timing_peers() as peers:
                for scenario in SCENARIOS:
                    with quiet_output():
                        fresh_table()
                        for name in APPS:
                            run_block(apps[name], traffic[name], peers, scenario, warmup)
                        for block in range(math.ceil(requests / BLOCK)):
                            fresh_table()
                            count = min(BLOCK, requests - block * BLOCK)
                            for name in APPS if block % 2 == 0 else APPS[::-1]:
                                samples += run_block(apps[name], traffic[name], peers, scenario, count)
                    if echo:
                        for name in APPS:
                            print(f"  {_describe([s for s in samples if s.app == name and s.scenario == scenario])}")
        finally:
            baseline.close()
            deps.reset()
    return samples


def _describe(samples: list[Sample]) -> str:
    first = samples[0]
    ours = [s.ours_ns / 1e6 for s in samples]
    total = [s.total_ns / 1e6 for s in samples]
    return (
        f"{first.scenario:<20} {first.app:<8}"
        f" our time p50 {percentile(ours, 50):6.2f} ms  p99 {percentile(ours, 99):6.2f} ms"
        f"   total p50 {percentile(total, 50):6.2f} ms  p99 {percentile(total, 99):6.2f} ms"
        f"   ({first.sectra_calls} Sectra, {first.aws_calls} AWS calls per request)"
    )


# --- cold import and cold start, each in a fresh interpreter -----------------------------------

_IMPORT_CHILD = "import time\nstarted = time.perf_counter()\nimport {module}\nprint(time.perf_counter() - started)\n"

# Imports nothing before the clock starts but json, sys and time; the request arrives on stdin.
_COLD_START_CHILD = r"""
import json, sys, time

spec = json.loads(sys.stdin.read())
started = time.perf_counter()
if spec["app"] == "ours":
    from lambdas.api.handler import handler

    imported = time.perf_counter()

    class Context:
        function_name = "slidebridge-api"
        memory_limit_in_mb = 1024
        invoked_function_arn = "arn:aws:lambda:eu-central-1:123456789012:function:slidebridge-api"
        aws_request_id = "bench-cold-start"

        @staticmethod
        def get_remaining_time_in_millis():
            return 29_000

    def call(request):
        return handler(request, Context())["statusCode"]

else:
    from bench.webhook_fastapi import app

    imported = time.perf_counter()
    import asyncio

    loop = asyncio.new_event_loop()

    def call(request):
        scope = dict(request["scope"], raw_path=request["scope"]["path"].encode())
        scope["query_string"] = scope["query_string"].encode()
        scope["headers"] = [(k.encode(), v.encode()) for k, v in scope["headers"]]
        body = request["body"].encode()
        answer = {}

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]

        loop.run_until_complete(app(scope, receive, send))
        return answer["status"]

first_status = call(spec["first"])
first = time.perf_counter()
second_status = call(spec["second"])
second = time.perf_counter()
print("BENCH-RESULT " + json.dumps({
    "import_s": imported - started,
    "first_s": first - imported,
    "second_s": second - first,
    "statuses": [first_status, second_status],
}))
"""


def _child_env(*, lambda_root: Path | None = None, xray_daemon: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LAMBDA_TASK_ROOT", None)
    if lambda_root is not None:
        env["LAMBDA_TASK_ROOT"] = str(lambda_root)  # Powertools: "in Lambda", tracing on
        env["AWS_LAMBDA_FUNCTION_NAME"] = "slidebridge-api"
        # What the Lambda runtime sets per invocation: a sampled trace, and where its daemon listens.
        env["_X_AMZN_TRACE_ID"] = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
        if xray_daemon is not None:
            env["AWS_XRAY_DAEMON_ADDRESS"] = xray_daemon
    # The bench package comes from this checkout even when the app under test comes from another.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def cold_import_ms(module: str, runs: int = 7, *, cwd: Path = REPO, lambda_root: Path | None = None) -> list[float]:
    """``import module`` in ``runs`` fresh interpreters started in ``cwd``: milliseconds each.

    One untimed run first, so that every timed one finds the bytecode already compiled.
    """
    env = _child_env(lambda_root=lambda_root)
    code = _IMPORT_CHILD.format(module=module)
    times = []
    for run in range(runs + 1):
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise BenchFailedError(f"import {module} failed in {cwd}:\n{done.stderr[-2000:]}")
        if run:
            times.append(float(done.stdout.split()[-1]) * 1000)
    return times


@dataclass(frozen=True)
class ColdStart:
    app: str  # "baseline" | "ours" | OURS_TRACED
    request: str  # "techcyte webhook" | "platform GET"
    import_ms: float
    first_ms: float  # the first request, after the import
    second_ms: float  # the next one, for comparison

    @property
    def cold_ms(self) -> float:
        return self.import_ms + self.first_ms


def _cold_request(app: str, request: str, task: int) -> dict[str, Any]:
    if request == "platform GET":
        if app != "ours":
            raise ValueError("the baseline serves the vendor webhooks only")
        return rest_event("GET", "/api/v1/runs", None, {"Authorization": f"Bearer {API_TOKEN}"})
    path, body = f"/hooks/techcyte/{TECHCYTE_KEY}", json.dumps(techcyte_webhook(task)).encode()
    if app == "ours":
        return rest_event("POST", path, body)
    scope = asgi_scope("POST", path, body)
    # JSON on the way to the child, which encodes these again.
    del scope["raw_path"]
    scope["query_string"] = scope["query_string"].decode()
    scope["headers"] = [(k.decode(), v.decode()) for k, v in scope["headers"]]
    return {"scope": scope, "body": body.decode()}


def _start_moto_server() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    # werkzeug (moto's server) logs every AWS call at INFO.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # moto keeps its state per process, server or not: start from nothing. Then its simple Batch
    # backend: jobs are recorded, never run (the same setting as the local stack).
    for path, payload in (("/moto-api/reset", {}), ("/moto-api/config", {"batch": {"use_docker": False}})):
        request = urllib.request.Request(
            url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    return server, url


def cold_starts(
    runs: int = 7,
    *,
    ours_tree: Path = REPO,
    cases: tuple[tuple[str, str], ...] = (
        ("baseline", "techcyte webhook"),
        ("ours", "techcyte webhook"),
        ("ours", "platform GET"),
        (OURS_TRACED, "techcyte webhook"),
    ),
) -> list[ColdStart]:
    """Import + first request in fresh interpreters, AWS on a moto server on 127.0.0.1.

    ``ours_tree``: the checkout whose ``lambdas``/``slidebridge`` ours imports (before/after comparisons).
    """
    server, url = _start_moto_server()
    # Stands in for the X-Ray daemon of the traced case: takes the segments, reads none.
    daemon = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    daemon.bind(("127.0.0.1", 0))
    results = []
    task = 9_000_000
    try:
        with environment(bench_environment(url)):
            provision()
            for _ in range(runs):
                for app, request in cases:
                    task += 2
                    kind = "baseline" if app == "baseline" else "ours"
                    tree = ours_tree if kind == "ours" else REPO
                    traced = app == OURS_TRACED
                    env = _child_env(
                        lambda_root=tree if traced else None,
                        xray_daemon=f"127.0.0.1:{daemon.getsockname()[1]}" if traced else None,
                    )
                    spec = {
                        "app": kind,
                        "first": _cold_request(kind, request, task),
                        "second": _cold_request(kind, request, task + 1),
                    }
                    done = subprocess.run(
                        [sys.executable, "-c", _COLD_START_CHILD],
                        cwd=tree,
                        env=env,
                        input=json.dumps(spec),
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
                    if done.returncode != 0 or not lines:
                        raise BenchFailedError(f"{app}, {request}: the cold start failed:\n{done.stderr[-2000:]}")
                    result = json.loads(lines[-1][len(RESULT_MARK) :])
                    if result["statuses"] != [200, 200]:
                        raise BenchFailedError(f"{app}, {request}: answered {result['statuses']}")
                    results.append(
                        ColdStart(
                            app,
                            request,
                            result["import_s"] * 1000,
                            result["first_s"] * 1000,
                            result["second_s"] * 1000,
                        )
                    )
    finally:
        daemon.close()
        server.stop()
    return results


# --- the report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookReport:
    samples: list[Sample]
    imports_ms: dict[str, list[float]]  # "baseline", "ours" and OURS_TRACED
    cold: list[ColdStart]

    def of(self, app: str, scenario: str) -> list[Sample]:
        return [s for s in self.samples if s.app == app and s.scenario == scenario]

    def ours_ms(self, app: str, scenario: str, q: float) -> float:
        """Percentile ``q`` of our own time (peers excluded), in ms."""
        return percentile([s.ours_ns / 1e6 for s in self.of(app, scenario)], q)

    def total_ms(self, app: str, scenario: str, q: float) -> float:
        return percentile([s.total_ns / 1e6 for s in self.of(app, scenario)], q)

    def import_ms(self, app: str) -> float:
        return float(statistics.median(self.imports_ms[app]))

    def cold_median(self, app: str, request: str, metric: str = "cold_ms") -> float:
        return float(statistics.median(getattr(c, metric) for c in self.cold if c.app == app and c.request == request))

    def rows(self) -> list[BenchRow]:
        rows = [
            BenchRow(
                "webhook: cold import of the handler module",
                self.import_ms("baseline"),
                self.import_ms("ours"),
                "ms",
                higher_is_better=False,
            ),
            BenchRow(
                "webhook: cold start, import + first Techcyte webhook",
                self.cold_median("baseline", "techcyte webhook"),
                self.cold_median("ours", "techcyte webhook"),
                "ms",
                higher_is_better=False,
            ),
        ]
        rows += [
            BenchRow(
                f"webhook: {scenario}, p99 of our time",
                self.ours_ms("baseline", scenario, 99),
                self.ours_ms("ours", scenario, 99),
                "ms",
                higher_is_better=False,
            )
            for scenario in SCENARIOS
        ]
        return rows


def run(
    requests: int = 500,
    warmup: int = 20,
    *,
    import_runs: int = 7,
    cold_runs: int = 7,
    ours_tree: Path = REPO,
    isolate: bool = True,
    echo: bool = False,
) -> WebhookReport:
    def say(text: str) -> None:
        if echo:
            print(text, flush=True)

    say(f"cold import, median of {import_runs} fresh interpreters (interpreter start-up excluded):")
    imports = {
        "baseline": cold_import_ms(BASELINE_MODULE, import_runs),
        "ours": cold_import_ms(OURS_MODULE, import_runs, cwd=ours_tree),
        OURS_TRACED: cold_import_ms(OURS_MODULE, import_runs, cwd=ours_tree, lambda_root=ours_tree),
    }
    for name, times in imports.items():
        say(f"  {name:<26} {statistics.median(times):7.1f} ms  (min {min(times):.1f}, max {max(times):.1f})")
    say(f"cold start: import + first request, median of {cold_runs}, AWS on a moto server:")
    cold = cold_starts(cold_runs, ours_tree=ours_tree)
    for app, request in dict.fromkeys((c.app, c.request) for c in cold):
        group = [c for c in cold if c.app == app and c.request == request]
        say(
            f"  {app:<26} {request:<17} import {statistics.median(c.import_ms for c in group):6.1f} ms"
            f" + first request {statistics.median(c.first_ms for c in group):6.1f} ms"
            f" = {statistics.median(c.cold_ms for c in group):6.1f} ms"
            f"   (the next request: {statistics.median(c.second_ms for c in group):5.1f} ms)"
        )
    say(f"per request: {requests} after {warmup} to warm up, in blocks of {BLOCK} (ABBA):")
    samples = run_requests(requests, warmup, isolate=isolate, echo=echo)
    return WebhookReport(samples, imports, cold)


def main(argv: list[str] | None = None) -> list[BenchRow]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500, help="measured requests per app and scenario")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests per app and scenario first")
    parser.add_argument("--import-runs", type=int, default=7, help="fresh interpreters per cold import")
    parser.add_argument("--cold-runs", type=int, default=7, help="fresh interpreters per cold start")
    parser.add_argument(
        "--ours-tree",
        type=Path,
        default=REPO,
        help="another checkout's lambdas/ and slidebridge/ for ours' cold import and start (before/after)",
    )
    args = parser.parse_args(argv)
    print(f"webhook handling in process: ours (api Lambda handler) against FastAPI; {os.cpu_count()} cores")
    report = run(
        args.requests,
        args.warmup,
        import_runs=args.import_runs,
        cold_runs=args.cold_runs,
        ours_tree=args.ours_tree.resolve(),
        echo=True,
    )
    print("our time (Sectra round trips and moto's service side excluded), p50 / p99 in ms:")
    for scenario in SCENARIOS:
        base50, base99 = report.ours_ms("baseline", scenario, 50), report.ours_ms("baseline", scenario, 99)
        ours50, ours99 = report.ours_ms("ours", scenario, 50), report.ours_ms("ours", scenario, 99)
        print(
            f"  {scenario:<20} baseline {base50:6.2f} / {base99:6.2f}   ours {ours50:6.2f} / {ours99:6.2f}"
            f"   ratio p50 {base50 / ours50:4.2f}x  p99 {base99 / ours99:4.2f}x"
        )
    ours_import = report.import_ms("ours")
    worst_p99 = max(report.ours_ms("ours", scenario, 99) for scenario in SCENARIOS)
    print(
        f"goals: import under 300 ms: {ours_import:.0f} ms ({'met' if ours_import < 300 else 'NOT met'}); "
        f"p99 under 20 ms: worst {worst_p99:.1f} ms ({'met' if worst_p99 < 20 else 'NOT met'})"
    )
    rows = report.rows()
    for row in rows:
        print(f"  {row.summary()}")
    return rows


if __name__ == "__main__":
    main()
