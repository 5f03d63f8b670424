"""A fake Techcyte API (``/api/v3``) on 127.0.0.1, written from ``vendors/TECHCYTE.md``.

It lives in ``local/`` because ``make demo`` plays Techcyte with it (``local/demo_techcyte.py``); the
tests import it through ``tests/fakes/techcyte.py``.

It enforces every server rule of the fact sheet (§ numbers refer to it):

- ``POST /token``: client credentials by Basic auth or by form fields; ``grant_type`` required;
  answers ``{"access_token": ...}`` only (whether ``expires_in`` exists is unknown, §4).
- Bearer auth on every ``/external`` call; a task JWT only reaches its own task's case.
- ``POST /external/results/{task_id}`` (plain integer or base64 ``task:<n>``): one transaction, all
  or nothing (§7); each scanId a numeric string of a scan of the task; the scan must have exactly one
  image region; ``results.summary`` a string when present; ``workflow.ruo`` a bool; known
  ``report.type`` only; every top-level geojson feature with a string ``annotation_type``;
  ``qcFailReasons`` null or a list of strings. Success: 201, empty body. Every POST appends
  (§7: append, not upsert) and marks the scans complete.
- ``GET /external/case_evaluations/{task_id}``: every evaluation of the case (integers for ids,
  ``details.report`` = results minus ``external_url``; the workflow is not returned).
- ``PATCH /external/case/{task_id}``: 204, type-checked triage fields only.
- Slide files at presigned-style URLs ``/files_uuid/<hex>.<digits>?X-Amz-...&X-Amz-Signature=...``
  (no extension), with Range support; a wrong or missing signature is 403.

Faults (:meth:`FakeTechcyte.fail_next`): a status answered before anything is processed (401, 429,
5xx), ``"drop_after_store"`` (results stored, then the connection closed without an answer) and
``"delay_after_store"`` (stored, then the answer waits longer than the client's timeout).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["KNOWN_REPORT_TYPES", "FakeScan", "FakeTask", "FakeTechcyte", "Fault", "global_id"]

KNOWN_REPORT_TYPES = frozenset(
    {
        "Basic",
        "WholeSlideDifferential",
        "AreaDifferential",
        "SemiQuantitativeDifferential",
        "RegionCounting",
        "AiMitosisCounting",
        "TumorCellularity",
    }
)


def global_id(kind: str, number: int) -> str:
    return base64.b64encode(f"{kind}:{number}".encode()).decode()


def _decode_task(raw: str) -> int | None:
    if raw.isdigit():
        return int(raw)
    try:
        text = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True).decode()
    except ValueError:
        return None
    kind, _, number = text.partition(":")
    return int(number) if kind == "task" and number.isdigit() else None


@dataclass
class FakeScan:
    scan_id: str
    regions: int = 1  # image regions (layers); the results POST rejects anything but 1 (§7)
    urls: list[str] = field(default_factory=list)
    stain: dict[str, str] | None = None
    complete: bool = False


@dataclass
class FakeTask:
    number: int
    case_number: int
    company_id: str
    scans: dict[str, FakeScan]
    jwt: str

    @property
    def task_id(self) -> str:
        return global_id("task", self.number)

    @property
    def case_id(self) -> str:
        return global_id("humanCase", self.case_number)


@dataclass
class Fault:
    kind: int | str  # HTTP status, "drop_after_store" or "delay_after_store"
    delay_s: float = 0.0


@dataclass
class _File:
    source: bytes | Path
    signature: str

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size

    def read(self, start: int, length: int) -> bytes:
        if isinstance(self.source, bytes):
            return self.source[start : start + length]
        with self.source.open("rb") as handle:
            handle.seek(start)
            return handle.read(length)


class _Invalid(Exception):
    pass


class FakeTechcyte:
    """Use as a context manager; :attr:`base_url` is the ``.../api/v3`` URL for the client."""

    def __init__(self, *, client_id: str = "fake-client", client_secret: str = "fake-secret") -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.tasks: dict[int, FakeTask] = {}
        self.evaluations: list[dict[str, Any]] = []
        self.posts: list[tuple[int, dict[str, Any]]] = []  # every accepted results body
        self.rejected: list[tuple[int, str]] = []  # (task, reason) of every refused results POST
        self.triage: dict[int, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self.token_requests: list[str] = []  # "basic" | "form" per successful exchange
        self._client_tokens: set[str] = set()
        self._files: dict[str, _File] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._lock = threading.Lock()
        self._next_task = 185714
        self._next_eval = 9000
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_HEAD(self) -> None:
                fake._handle(self, "HEAD")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.root = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.root}/api/v3"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- set-up and inspection ---------------------------------------------------------------

    def add_file(self, source: bytes | Path) -> str:
        """Serve ``source`` at a presigned-style URL whose key has no meaningful extension (§10)."""
        key = f"files_uuid/{secrets.token_hex(8)}.{secrets.randbelow(10**7)}"
        signature = secrets.token_hex(16)
        self._files[key] = _File(source, signature)
        return (
            f"{self.root}/{key}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20260101T000000Z"
            f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={signature}"
        )

    def add_task(
        self,
        scans: dict[str, list[bytes | Path]],
        *,
        case_number: int = 2421366,
        company_id: str = "2380941",
        regions: dict[str, int] | None = None,
        stains: dict[str, dict[str, str]] | None = None,
    ) -> FakeTask:
        """A task with these scans (scan id → its files); ``regions`` overrides a scan's region count."""
        with self._lock:
            number = self._next_task
            self._next_task += 1
        task = FakeTask(
            number=number,
            case_number=case_number,
            company_id=company_id,
            scans={
                scan_id: FakeScan(
                    scan_id=scan_id,
                    regions=(regions or {}).get(scan_id, 1),
                    urls=[self.add_file(source) for source in files],
                    stain=(stains or {}).get(scan_id),
                )
                for scan_id, files in scans.items()
            },
            jwt="eyJ" + secrets.token_urlsafe(12) + "." + secrets.token_urlsafe(24) + "." + secrets.token_urlsafe(8),
        )
        self.tasks[number] = task
        return task

    def webhook_payload(self, task: FakeTask, *, with_jwt: bool = True, legacy: bool = False) -> dict[str, Any]:
        """The body Techcyte would POST to our webhook (§2); ``legacy``: the older shape without
        ``scan_urls``/``stains``; ``with_jwt=False``: a debug payload from the task notes."""
        body: dict[str, Any] = {
            "company_id": task.company_id,
            "scans": {scan.scan_id: scan.urls[0] for scan in task.scans.values()},
            "task_id": task.task_id,
            "case_id": task.case_id,
            "model_name": "",
        }
        if not legacy:
            body["scan_urls"] = {scan.scan_id: list(scan.urls) for scan in task.scans.values()}
            body["stains"] = {scan.scan_id: scan.stain for scan in task.scans.values() if scan.stain}
        if with_jwt:
            body["jwt_token"] = task.jwt
        return body

    def add_evaluation(self, *, task_number: int, case_number: int, sample_id: int, report: dict[str, Any]) -> None:
        """Another task's (or a human's) evaluation on a case: case_evaluations returns it too (§6)."""
        with self._lock:
            self._next_eval += 1
            self.evaluations.append(
                {
                    "id": self._next_eval,
                    "sample_id": sample_id,
                    "case_id": case_number,
                    "task_id": task_number,
                    "details": {"report": report},
                }
            )

    def evaluations_of(self, task: FakeTask) -> list[dict[str, Any]]:
        return [e for e in self.evaluations if e["task_id"] == task.number]

    def fail_next(self, endpoint: str, kind: int | str, *, times: int = 1, delay_s: float = 0.0) -> None:
        """Fault the next ``times`` calls of ``endpoint`` (``token``, ``results``,
        ``case_evaluations``, ``case``, ``file``)."""
        self._faults.setdefault(endpoint, []).extend(Fault(kind, delay_s) for _ in range(times))

    def revoke_tokens(self) -> None:
        """Every client-credentials token issued so far stops working (an expiry)."""
        self._client_tokens.clear()

    # --- request handling --------------------------------------------------------------------

    def _fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(endpoint)
            return queue.pop(0) if queue else None

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        self.requests.append((method, path, {k.lower(): v for k, v in h.headers.items()}))
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            if path.startswith("/files_uuid/") and method in ("GET", "HEAD"):
                self._file(h, method, path.lstrip("/"), parse_qs(parts.query))
            elif path == "/api/v3/token" and method == "POST":
                self._token(h, raw)
            elif (m := re.fullmatch(r"/api/v3/external/results/([^/]+)", path)) and method == "POST":
                self._results(h, m.group(1), raw)
            elif (m := re.fullmatch(r"/api/v3/external/case_evaluations/([^/]+)", path)) and method == "GET":
                self._case_evaluations(h, m.group(1))
            elif (m := re.fullmatch(r"/api/v3/external/case/([^/]+)", path)) and method == "PATCH":
                self._patch_case(h, m.group(1), raw)
            else:
                self._send(h, 404, {"detail": "Not Found"})
        except BrokenPipeError:
            pass

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler, status: int, body: Any = None, *, headers: dict[str, str] | None = None
    ) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        h.send_response(status)
        if body is not None:
            h.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if data:
            h.wfile.write(data)

    def _status_fault(self, h: BaseHTTPRequestHandler, endpoint: str) -> Fault | None:
        """Answer a queued status fault; return a store-then-fail fault for the caller to apply."""
        fault = self._fault(endpoint)
        if fault is not None and isinstance(fault.kind, int):
            self._send(h, fault.kind, {"detail": f"injected {fault.kind}"}, headers={"Retry-After": "0"})
            return Fault(-1)
        return fault

    def _file(self, h: BaseHTTPRequestHandler, method: str, key: str, query: dict[str, list[str]]) -> None:
        if self._status_fault(h, "file") is not None:
            return
        entry = self._files.get(key)
        if entry is None:
            self._send(h, 404, {"detail": "NoSuchKey"})
            return
        if query.get("X-Amz-Signature") != [entry.signature]:
            self._send(h, 403, {"detail": "SignatureDoesNotMatch"})
            return
        size = entry.size
        start, end, status = 0, size - 1, 200
        rng = h.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                self._send(h, 416, {"detail": "InvalidRange"}, headers={"Content-Range": f"bytes */{size}"})
                return
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start, end = max(0, size - int(m.group(2))), size - 1
            if start >= size or start > end:
                self._send(h, 416, {"detail": "InvalidRange"}, headers={"Content-Range": f"bytes */{size}"})
                return
            status = 206
        h.send_response(status)
        h.send_header("Content-Type", "binary/octet-stream")
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if method == "GET":
            position = start
            while position <= end:  # streamed in 1 MiB pieces: a slide is never held in memory
                chunk = entry.read(position, min(1 << 20, end - position + 1))
                h.wfile.write(chunk)
                position += len(chunk)

    def _token(self, h: BaseHTTPRequestHandler, raw: bytes) -> None:
        if self._status_fault(h, "token") is not None:
            return
        if not (h.headers.get("Content-Type") or "").startswith("application/x-www-form-urlencoded"):
            self._send(h, 400, {"error": "invalid_request", "error_description": "form body expected"})
            return
        form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
        if form.get("grant_type") != "client_credentials":
            self._send(h, 400, {"error": "unsupported_grant_type"})
            return
        auth = h.headers.get("Authorization") or ""
        style, cid, secret = "form", form.get("client_id"), form.get("client_secret")
        if auth.startswith("Basic "):
            try:
                cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                cid = secret = None
            style = "basic"
        if cid != self.client_id or secret != self.client_secret:
            self._send(h, 401, {"error": "invalid_client"})
            return
        token = "tc_" + secrets.token_urlsafe(24)
        self._client_tokens.add(token)
        self.token_requests.append(style)
        self._send(h, 200, {"access_token": token})

    def _authorise(self, h: BaseHTTPRequestHandler, task: FakeTask | None) -> bool:
        auth = h.headers.get("Authorization") or ""
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if token in self._client_tokens:
            return True
        jwt_task = next((t for t in self.tasks.values() if t.jwt == token), None) if token else None
        if jwt_task is None:
            self._send(h, 401, {"detail": "Unauthorized"})
            return False
        if task is not None and jwt_task.case_number != task.case_number:
            self._send(h, 403, {"detail": "task token has no permission on this case"})
            return False
        return True

    def _task(self, h: BaseHTTPRequestHandler, raw_id: str) -> FakeTask | None:
        number = _decode_task(raw_id)
        task = self.tasks.get(number) if number is not None else None
        if task is None:
            self._send(h, 404, {"detail": "task not found"})
        return task

    def _results(self, h: BaseHTTPRequestHandler, raw_id: str, raw: bytes) -> None:
        fault = self._status_fault(h, "results")
        if fault is not None and fault.kind == -1:
            return
        number = _decode_task(raw_id)
        task = self.tasks.get(number) if number is not None else None
        if not self._authorise(h, task):
            return
        if task is None:
            self._send(h, 404, {"detail": "task not found"})
            return
        try:
            body = json.loads(raw)
            self._validate_results(task, body)
        except (ValueError, _Invalid) as exc:
            self.rejected.append((task.number, str(exc)))
            self._send(h, 400, {"detail": f"Invalid request: {exc}"})
            return
        with self._lock:  # one transaction: all scans or none (validated above)
            self.posts.append((task.number, body))
            for scan in body["scanResults"]:
                results = dict(scan.get("results") or {})
                details: dict[str, Any] = {}
                url = results.get("external_url")
                if isinstance(url, str):
                    details["external_url"] = results.pop("external_url")
                details["report"] = results
                if "caseResults" in body:
                    details["caseReport"] = body["caseResults"]
                self._next_eval += 1
                self.evaluations.append(
                    {
                        "id": self._next_eval,
                        "sample_id": int(scan["scanId"]),
                        "case_id": task.case_number,
                        "task_id": task.number,
                        "details": details,
                    }
                )
                task.scans[scan["scanId"]].complete = True
        if fault is not None and fault.kind == "drop_after_store":
            h.close_connection = True
            return  # no answer at all: the client sees the connection close
        if fault is not None and fault.kind == "delay_after_store":
            time.sleep(fault.delay_s)
        self._send(h, 201)

    def _validate_results(self, task: FakeTask, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("scanResults"), list):
            raise _Invalid("scanResults must be a list")
        for i, scan in enumerate(body["scanResults"]):
            where = f"scanResults[{i}]"
            if not isinstance(scan, dict):
                raise _Invalid(f"{where} must be an object")
            scan_id = scan.get("scanId")
            if not isinstance(scan_id, str) or not scan_id.isdigit():
                raise _Invalid(f"{where}.scanId must be a numeric string")
            if scan_id not in task.scans:
                raise _Invalid(f"{where}.scanId {scan_id} does not belong to the task")
            if task.scans[scan_id].regions != 1:
                raise _Invalid(f"scan {scan_id} must have exactly one image region")
            results = scan.get("results")
            if results is not None:
                if not isinstance(results, dict):
                    raise _Invalid(f"{where}.results must be an object")
                if "summary" in results and results["summary"] is not None and not isinstance(results["summary"], str):
                    raise _Invalid(f"{where}.results.summary must be a string")
            workflow = scan.get("workflow")
            if workflow is not None:
                self._validate_workflow(workflow, f"{where}.workflow")
            geojson = scan.get("geojson")
            if geojson is not None:
                if not isinstance(geojson, dict) or not isinstance(geojson.get("features"), list):
                    raise _Invalid(f"{where}.geojson must be a FeatureCollection")
                for j, feature in enumerate(geojson["features"]):
                    props = feature.get("properties") if isinstance(feature, dict) else None
                    if not isinstance(props, dict) or not isinstance(props.get("annotation_type"), str):
                        raise _Invalid(f"{where}.geojson.features[{j}].properties.annotation_type must be a string")
                    bbox = feature.get("bbox")
                    if bbox is not None and (
                        not isinstance(bbox, list)
                        or len(bbox) != 4
                        or not all(isinstance(v, int | float) for v in bbox)
                    ):
                        raise _Invalid(f"{where}.geojson.features[{j}].bbox must be 4 numbers")
            reasons = scan.get("qcFailReasons")
            if reasons is not None and (not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons)):
                raise _Invalid(f"{where}.qcFailReasons must be null or a list of strings")

    @staticmethod
    def _validate_workflow(workflow: Any, where: str) -> None:
        if not isinstance(workflow, dict):
            raise _Invalid(f"{where} must be an object")
        for key in ("model_name", "provider"):
            if not isinstance(workflow.get(key), str):
                raise _Invalid(f"{where}.{key} must be a string")
        if not isinstance(workflow.get("ruo"), bool):
            raise _Invalid(f"{where}.ruo must be a bool")
        for key in ("key", "value"):
            if key in workflow and workflow[key] is not None and not isinstance(workflow[key], str):
                raise _Invalid(f"{where}.{key} must be a string")
        report = workflow.get("report")
        if report is None:
            return
        if not isinstance(report, dict) or report.get("type") not in KNOWN_REPORT_TYPES:
            raise _Invalid(f"{where}.report.type is unknown")
        if report["type"] == "Basic":
            for line in report.get("results") or []:
                if not (
                    isinstance(line, dict) and isinstance(line.get("name"), str) and isinstance(line.get("result"), str)
                ):
                    raise _Invalid(f"{where}.report.results need string name and result")
            for segment in report.get("segments") or []:
                if not (
                    isinstance(segment, dict)
                    and isinstance(segment.get("name"), str)
                    and isinstance(segment.get("result"), str)
                    and isinstance(segment.get("feature_collection"), dict)
                ):
                    raise _Invalid(f"{where}.report.segments need name, result and feature_collection")

    def _case_evaluations(self, h: BaseHTTPRequestHandler, raw_id: str) -> None:
        if self._status_fault(h, "case_evaluations") is not None:
            return
        task = self._task(h, raw_id)
        if task is None or not self._authorise(h, task):
            return
        with self._lock:
            items = [e for e in self.evaluations if e["case_id"] == task.case_number]
        self._send(h, 200, items)

    def _patch_case(self, h: BaseHTTPRequestHandler, raw_id: str, raw: bytes) -> None:
        if self._status_fault(h, "case") is not None:
            return
        task = self._task(h, raw_id)
        if task is None or not self._authorise(h, task):
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send(h, 400, {"detail": "Invalid request: not JSON"})
            return
        if not isinstance(body, dict):
            self._send(h, 400, {"detail": "Invalid request: object expected"})
            return
        category, score = body.get("triage_category"), body.get("triage_score")
        if category is not None and not isinstance(category, str):
            self._send(h, 400, {"detail": "Invalid request: triage_category must be a string"})
            return
        if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
            self._send(h, 400, {"detail": "Invalid request: triage_score must be a number"})
            return
        current = self.triage.setdefault(task.case_number, {})
        current.update({k: v for k, v in body.items() if k in ("triage_category", "triage_score")})
        self._send(h, 204)
