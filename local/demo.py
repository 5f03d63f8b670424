"""``make demo``: every front door end to end against the local stack, on a generated slide.

The demo starts ``python -m local serve`` as a child process (exactly what an outside client sees;
its log goes to ``demo-output/local-stack.log``), generates an H&E-like pyramidal TIFF (cached by its
parameters, so re-runs are fast), uploads it to the local S3 and runs each flow in ``FLOWS``:

- ``platform``: ``POST /api/v1/runs`` with a presigned URL, polls the run and its items, downloads
  every output artifact through its 307 URL and checks its CRC32C.
- ``sectra``: a mock Sectra PACS (in this process, on loopback) serves the same slide and invokes
  ``POST /hooks/sectra/{key}`` with a ``create``; the demo prints each update of the annotation
  ("Analysis queued" → "Analysing… 25 %" → … → the headline) and draws the final result on the slide
  thumbnail (``sectra-result.png``). See ``local/demo_sectra.py``.
- ``techcyte``: a fake Techcyte API (in this process, on loopback, started before the stack so that
  the stack posts its results there) registers a task with two scans (the slide and a small DICOM
  series), POSTs its webhook body to ``/hooks/techcyte/{key}``, waits for the task's one results
  POST, prints what the lab sees and draws the posted GeoJSON on the slide thumbnail
  (``techcyte-result.png``). See ``local/demo_techcyte.py``.

A flow is anything with a ``name`` and ``run(ctx) -> FlowResult``; a flow whose peer the stack must
know at start also has ``prepare(env, resources)`` (:class:`StackPreparer`). The demo exits 0 only
if every flow succeeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import httpx

from local.stack import (
    DEFAULT_BUCKET_NAME,
    FIXED_KEY_VARIABLES,
    StackProcess,
    StackStartError,
)
from slidebridge.checksums import Crc32cHasher, crc32c_b64_of_file

if TYPE_CHECKING:
    from local.fake_techcyte import FakeTechcyte

__all__ = [
    "FLOWS",
    "ArtifactCheck",
    "DemoContext",
    "DemoError",
    "Flow",
    "FlowResult",
    "PlatformClient",
    "PlatformFlow",
    "SectraFlow",
    "SlideFile",
    "StackPreparer",
    "TechcyteFlow",
    "cached_synthetic_slide",
    "platform_run_body",
    "run_demo",
    "stack_environment",
    "upload_slide",
]

# The SDK's file extensions by media type (PLATFORM_API §10); anything else is saved as .bin.
EXTENSIONS = {
    "image/png": ".png",
    "image/tiff": ".tiff",
    "application/vnd.apache.parquet": ".parquet",
    "application/geo+json": ".json",
    "application/json": ".json",
    "text/csv": ".csv",
    "application/zip": ".zip",
}
# Presigned input URLs should stay valid for at least 6 days (PLATFORM_API §3).
INPUT_URL_TTL_S = 6 * 24 * 3600
_DOWNLOAD_CHUNK = 8 * 1024 * 1024


class DemoError(RuntimeError):
    """A demo step failed; the message says which and why."""


# --- inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideFile:
    path: Path
    width_px: int
    height_px: int
    mpp: float
    checksum_base64_crc32c: str
    media_type: str = "image/tiff"

    def metadata(self) -> dict[str, Any]:
        """The ``whole_slide_image`` input artifact metadata (PLATFORM_API §3)."""
        return {
            "checksum_base64_crc32c": self.checksum_base64_crc32c,
            "width_px": self.width_px,
            "height_px": self.height_px,
            "resolution_mpp": self.mpp,
            "media_type": self.media_type,
        }


def cached_synthetic_slide(
    cache_dir: Path, width: int, height: int, *, seed: int = 0, mpp: float = 0.25, workers: int = 1
) -> SlideFile:
    """An H&E-like pyramidal TIFF of ``width × height`` level-0 px, generated once per parameter set
    (by ``workers`` processes; the file does not depend on how many)."""
    from local.synthetic import write_synthetic_slide  # noqa: PLC0415 - numpy-heavy, only when needed

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"synthetic-{width}x{height}-seed{seed}-mpp{mpp:g}.tiff"
    if not path.exists():
        # Written under a temporary name first: an interrupted run must not leave a truncated "cache".
        partial = path.with_suffix(".partial")
        write_synthetic_slide(partial, width, height, seed=seed, mpp=mpp, workers=workers)
        partial.replace(path)
    return SlideFile(path, width, height, mpp, crc32c_b64_of_file(path))


def upload_slide(s3: Any, bucket: str, path: Path, key: str, *, expires_in_s: int = INPUT_URL_TTL_S) -> str:
    """Upload ``path`` to ``s3://bucket/key``; returns a presigned GET URL for it."""
    s3.upload_file(str(path), bucket, key)
    url: str = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_in_s)
    return url


# --- the Platform API, as a client sees it --------------------------------------------------------


@dataclass(frozen=True)
class ArtifactCheck:
    name: str
    media_type: str
    size_bytes: int
    expected_checksum: str
    actual_checksum: str
    path: Path

    @property
    def checksum_ok(self) -> bool:
        return self.expected_checksum == self.actual_checksum


class PlatformClient:
    """The handful of Platform API calls the demo and the end-to-end tests make (httpx, bearer token)."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 60.0) -> None:
        # trust_env=False: loopback only, never through a proxy from the environment.
        self.http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=timeout_s,
            trust_env=False,
        )
        # Presigned URLs are fetched without our token, as the SDK does.
        self._anonymous = httpx.Client(timeout=timeout_s, trust_env=False)

    def close(self) -> None:
        self.http.close()
        self._anonymous.close()

    def __enter__(self) -> PlatformClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _expect(response: httpx.Response, status: int) -> Any:
        if response.status_code != status:
            request = response.request
            raise DemoError(
                f"{request.method} {request.url.path} answered {response.status_code} "
                f"(expected {status}): {response.text[:1000]}"
            )
        return response.json()

    def submit_run(self, body: dict[str, Any]) -> str:
        created = self._expect(self.http.post("/api/v1/runs", json=body), 201)
        return str(created["run_id"])

    def get_run(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self._expect(self.http.get(f"/api/v1/runs/{run_id}"), 200)
        return run

    def list_items(self, run_id: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            batch = self._expect(
                self.http.get(f"/api/v1/runs/{run_id}/items", params={"page": page, "page_size": 100}), 200
            )
            items.extend(batch)
            if len(batch) < 100:
                return items
            page += 1

    def wait_for_run(
        self,
        run_id: str,
        *,
        timeout_s: float,
        poll_s: float = 1.0,
        on_progress: Callable[[dict[str, Any], list[dict[str, Any]], float], None] | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Poll until the run is TERMINATED; returns the run and its items."""
        start = time.monotonic()
        while True:
            run = self.get_run(run_id)
            items = self.list_items(run_id)
            elapsed = time.monotonic() - start
            if on_progress is not None:
                on_progress(run, items, elapsed)
            if run["state"] == "TERMINATED":
                return run, items
            if elapsed > timeout_s:
                raise DemoError(f"run {run_id} still {run['state']} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def artifact_location(self, run_id: str, artifact_id: str) -> str:
        response = self.http.get(f"/api/v1/runs/{run_id}/artifacts/{artifact_id}/file", follow_redirects=False)
        if response.status_code != 307 or "location" not in response.headers:
            raise DemoError(
                f"GET artifact {artifact_id} file answered {response.status_code}, not a 307 redirect: "
                f"{response.text[:500]}"
            )
        return response.headers["location"]

    def download_artifact(self, run_id: str, artifact: dict[str, Any], dest_dir: Path) -> ArtifactCheck:
        """Fetch one output artifact through its 307 URL, hashing it as it streams to disk."""
        metadata = artifact.get("metadata") or {}
        media_type = str(metadata.get("media_type") or metadata.get("mime_type") or "")
        name = str(artifact["name"])
        # "heatmap:png" → "heatmap.png": the part before the colon, the SDK's extension.
        path = dest_dir / f"{name.split(':', 1)[0]}{EXTENSIONS.get(media_type, '.bin')}"
        dest_dir.mkdir(parents=True, exist_ok=True)
        location = self.artifact_location(run_id, str(artifact["output_artifact_id"]))
        hasher = Crc32cHasher()
        with self._anonymous.stream("GET", location) as response, path.open("wb") as fh:
            if response.status_code != 200:
                raise DemoError(f"fetching {name} from its presigned URL answered {response.status_code}")
            for chunk in response.iter_bytes(_DOWNLOAD_CHUNK):
                hasher.update(chunk)
                fh.write(chunk)
        return ArtifactCheck(
            name=name,
            media_type=media_type,
            size_bytes=hasher.length,
            expected_checksum=str(metadata.get("checksum_base64_crc32c", "")),
            actual_checksum=hasher.b64,
            path=path,
        )


def platform_run_body(
    slide: SlideFile, download_url: str, external_id: str, *, application_id: str = "he-tissue"
) -> dict[str, Any]:
    """A ``RunCreationRequest`` with one whole-slide-image item (PLATFORM_API §3)."""
    return {
        "application_id": application_id,
        "version_number": "1.0.0",
        "custom_metadata": {"source": "slidebridge-demo"},
        "items": [
            {
                "external_id": external_id,
                "input_artifacts": [
                    {"name": "whole_slide_image", "download_url": download_url, "metadata": slide.metadata()}
                ],
            }
        ],
    }


# --- flows ----------------------------------------------------------------------------------------


@dataclass
class DemoContext:
    stack: StackProcess
    api_token: str
    output_dir: Path
    slide: SlideFile
    bucket: str
    timeout_s: float
    s3: Any
    # The stack's SLIDEBRIDGE_SECTRA_WEBHOOK_KEY (the path key of /hooks/sectra/{key}).
    sectra_webhook_key: str | None = None
    # The stack's SLIDEBRIDGE_TECHCYTE_WEBHOOK_KEY (the path key of /hooks/techcyte/{key}).
    techcyte_webhook_key: str | None = None

    def presigned_slide_url(self, key: str) -> str:
        return upload_slide(self.s3, self.bucket, self.slide.path, key)


@dataclass
class FlowResult:
    flow: str
    ok: bool
    message: str = ""
    run_id: str | None = None
    elapsed_s: float = 0.0
    artifacts: list[ArtifactCheck] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    run_wall_time_s: float | None = None
    # What a vendor's viewer shows: the result's one-line text and its key/value properties.
    headline: str | None = None
    display_properties: dict[str, Any] = field(default_factory=dict)
    # Pictures written for people to look at (overlays on the slide thumbnail).
    images: list[Path] = field(default_factory=list)


class Flow(Protocol):
    name: str

    def run(self, ctx: DemoContext) -> FlowResult: ...


@runtime_checkable
class StackPreparer(Protocol):
    """A flow whose peer the stack must know when it starts (e.g. the Techcyte API URL)."""

    def prepare(self, env: dict[str, str], resources: contextlib.ExitStack) -> None:
        """Called before the stack starts: start the peer (stopped by ``resources`` after the stack)
        and put its settings into ``env``, the stack's environment. Raises ``DemoError``."""


class Progress:
    """One status line per poll: rewritten in place on a terminal, printed on change otherwise."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._tty = sys.stdout.isatty()
        self._last = ""
        self._last_print = 0.0

    def __call__(self, run: dict[str, Any], items: list[dict[str, Any]], elapsed: float) -> None:
        stats = run.get("statistics", {})
        status = (
            f"{run['state']}"
            + (f"/{run['termination_reason']}" if run.get("termination_reason") else "")
            + f"  items {stats.get('item_count', len(items))}: "
            + f"pending {stats.get('item_pending_count', '?')}, "
            + f"processing {stats.get('item_processing_count', '?')}, "
            + f"succeeded {stats.get('item_succeeded_count', '?')}, "
            + f"user error {stats.get('item_user_error_count', '?')}, "
            + f"system error {stats.get('item_system_error_count', '?')}"
        )
        line = f"  [{self._label}] {elapsed:6.0f} s  {status}"
        if self._tty:
            print("\r" + line.ljust(len(self._last)), end="\n" if run["state"] == "TERMINATED" else "", flush=True)
            self._last = line
        elif status != self._last or time.monotonic() - self._last_print > 30:
            print(line, flush=True)
            self._last, self._last_print = status, time.monotonic()


class PlatformFlow:
    """Submit through the Platform API, wait, download and verify every output artifact."""

    name = "platform"

    def run(self, ctx: DemoContext) -> FlowResult:
        start = time.monotonic()
        key = f"slides/demo/{ctx.slide.path.name}"
        url = ctx.presigned_slide_url(key)
        external_id = f"demo/{ctx.slide.path.name}"  # a slash, as the CLI's file paths have
        with PlatformClient(ctx.stack.url, ctx.api_token) as client:
            run_id = client.submit_run(platform_run_body(ctx.slide, url, external_id))
            print(f"  [platform] run {run_id} submitted", flush=True)
            run, items = client.wait_for_run(run_id, timeout_s=ctx.timeout_s, on_progress=Progress(self.name))
            result = FlowResult(self.name, ok=False, run_id=run_id, run_wall_time_s=_run_wall_time_s(run))
            problems = []
            if run.get("termination_reason") != "ALL_ITEMS_PROCESSED":
                problems.append(f"run ended {run.get('termination_reason')}")
            dest_root = ctx.output_dir / self.name
            for item in items:
                if item.get("termination_reason") != "SUCCEEDED":
                    problems.append(
                        f"item {item['external_id']} ended {item.get('termination_reason')}: "
                        f"{item.get('error_code')} {item.get('error_message')}"
                    )
                    continue
                dest = dest_root / _safe_name(str(item["external_id"]))
                for artifact in item.get("output_artifacts", []):
                    if artifact.get("output") != "AVAILABLE":
                        problems.append(f"artifact {artifact['name']} is {artifact.get('output')}")
                        continue
                    check = client.download_artifact(run_id, artifact, dest)
                    result.artifacts.append(check)
                    if not check.checksum_ok:
                        problems.append(
                            f"artifact {check.name}: CRC32C {check.actual_checksum} != {check.expected_checksum}"
                        )
                    if check.name == "summary:json":
                        result.summary = json.loads(check.path.read_text())
                    if check.name == "heatmap:png":
                        # Also at the top of the output folder, where people look first.
                        heatmap = ctx.output_dir / f"{self.name}-heatmap.png"
                        shutil.copyfile(check.path, heatmap)
                        result.images.append(heatmap)
            if not result.artifacts and not problems:
                problems.append("no output artifacts")
        result.ok = not problems
        result.message = "; ".join(problems) or f"run {run_id}: all items succeeded"
        result.elapsed_s = time.monotonic() - start
        return result


def _run_wall_time_s(run: dict[str, Any]) -> float | None:
    try:
        submitted = datetime.fromisoformat(str(run["submitted_at"]).replace("Z", "+00:00"))
        terminated = datetime.fromisoformat(str(run["terminated_at"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return (terminated - submitted).total_seconds()


def _safe_name(external_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in external_id)


class SectraFlow:
    """A mock Sectra PACS invokes the webhook; follow the annotation; draw the final result."""

    name = "sectra"

    def run(self, ctx: DemoContext) -> FlowResult:
        # Imported here: sectra_client (the mock) is a dev dependency that brings FastAPI and uvicorn.
        from local.demo_sectra import run_sectra_flow  # noqa: PLC0415

        return run_sectra_flow(ctx, self.name)


class TechcyteFlow:
    """A fake Techcyte API sends an AI request to the webhook; check and draw the one results POST."""

    name = "techcyte"

    def __init__(self) -> None:
        self._fake: FakeTechcyte | None = None

    def prepare(self, env: dict[str, str], resources: contextlib.ExitStack) -> None:
        from local.demo_techcyte import start_fake_techcyte  # noqa: PLC0415 - PIL/openslide, only when run

        self._fake = start_fake_techcyte(env, resources)

    def run(self, ctx: DemoContext) -> FlowResult:
        from local.demo_techcyte import run_techcyte_flow  # noqa: PLC0415

        if self._fake is None:
            raise DemoError("the fake Techcyte API was not started before the stack (prepare was not called)")
        return run_techcyte_flow(ctx, self._fake, self.name)


FLOWS: list[Flow] = [PlatformFlow(), SectraFlow(), TechcyteFlow()]


# --- reporting ------------------------------------------------------------------------------------


def _percent(fraction: Any) -> str:
    return f"{100 * float(fraction):.1f} %" if isinstance(fraction, int | float) else str(fraction)


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    """The figures a pathologist looks at first, from ``summary:json`` (missing ones are left out)."""
    lines = []
    if "tissue_area_mm2" in summary:
        analysed = summary.get("analysed_area_mm2")
        lines.append(
            f"tissue area {summary['tissue_area_mm2']:.3f} mm²"
            + (f" of {analysed:.3f} mm² analysed" if isinstance(analysed, int | float) else "")
        )
    fractions = summary.get("class_fractions")
    if isinstance(fractions, dict):
        lines.append("class fractions " + ", ".join(f"{k} {_percent(v)}" for k, v in fractions.items()))
    tiles_value = summary.get("tiles")
    tiles: dict[str, Any] = tiles_value if isinstance(tiles_value, dict) else {}
    if "tile_count" in summary:
        grid = ""
        if "classifier_tile_px" in tiles and "classifier_mpp" in tiles:
            grid = f" ({tiles['classifier_tile_px']} px tiles at {tiles['classifier_mpp']:g} µm/px)"
        lines.append(f"tiles {summary['tile_count']}{grid}")
    if "region_count" in summary:
        lines.append(f"class regions {summary['region_count']}")
    for key in ("timings_s", "wall_times_s", "stage_seconds", "timings"):
        timings = summary.get(key)
        if isinstance(timings, dict):
            lines.append("wall times " + ", ".join(f"{k} {float(v):.1f} s" for k, v in timings.items()))
            break
    return lines


def _human_size(size: int) -> str:
    units = ["B", "KiB", "MiB", "GiB"]
    amount = float(size)
    for unit in units:
        if amount < 1024 or unit == units[-1]:
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{size} B"


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_report(results: list[FlowResult]) -> None:
    print("\n=== slidebridge demo summary ===", flush=True)
    for result in results:
        verdict = "OK" if result.ok else "FAILED"
        print(f"\n[{result.flow}] {verdict} in {result.elapsed_s:.0f} s: {result.message}")
        if result.artifacts:
            rows = [("artifact", "media type", "size", "checksum", "file")]
            rows += [
                (
                    a.name,
                    a.media_type,
                    _human_size(a.size_bytes),
                    "ok" if a.checksum_ok else "MISMATCH",
                    _display_path(a.path),
                )
                for a in result.artifacts
            ]
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            for row in rows:
                print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if result.run_wall_time_s is not None:
            span = "create → final result" if result.headline is not None else "submitted → terminated"
            print(f"  run wall time {result.run_wall_time_s:.1f} s ({span})")
        for line in _summary_lines(result.summary or {}):
            print(f"  {line}")
        if result.headline is not None:
            print(f"  headline  {result.headline}")
        if result.display_properties:
            width = max(len(str(key)) for key in result.display_properties)
            for key, value in result.display_properties.items():
                print(f"    {str(key).ljust(width)}  {value}")
        for image in result.images:
            print(f"  picture {_display_path(image)}")
    print(flush=True)


# --- entry point ----------------------------------------------------------------------------------


def stack_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``python -m local serve`` child: fixed keys chosen here, so we know them."""
    env = dict(os.environ if base is None else base)
    for name in FIXED_KEY_VARIABLES:
        if not env.get(name):
            env[name] = secrets.token_urlsafe(32)
    env.setdefault("SLIDEBRIDGE_BUCKET_NAME", DEFAULT_BUCKET_NAME)
    return env


def run_demo(
    *,
    output_dir: Path,
    size: int = 20_000,
    timeout_s: float = 3600.0,
    flows: list[Flow] | None = None,
) -> int:
    """Run every flow against a fresh local stack; 0 when all succeeded."""
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"slidebridge demo: {size} x {size} px synthetic H&E slide, output in {output_dir}/", flush=True)
    try:
        slide = cached_synthetic_slide(output_dir / "cache", size, size)
    except Exception as exc:
        print(f"demo FAILED: could not generate the synthetic slide: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"  slide {slide.path} ({_human_size(slide.path.stat().st_size)}, CRC32C {slide.checksum_base64_crc32c})")

    selected = FLOWS if flows is None else flows
    env = stack_environment()
    # Peers the stack calls (the fake Techcyte API) start first and stop after the stack.
    resources = contextlib.ExitStack()
    with resources:
        try:
            for flow in selected:
                if isinstance(flow, StackPreparer):
                    flow.prepare(env, resources)
        except DemoError as exc:
            print(f"demo FAILED: {exc}", file=sys.stderr, flush=True)
            return 1
        return _run_flows(selected, env, output_dir=output_dir, slide=slide, timeout_s=timeout_s, started=started)


def _run_flows(
    flows: list[Flow],
    env: dict[str, str],
    *,
    output_dir: Path,
    slide: SlideFile,
    timeout_s: float,
    started: float,
) -> int:
    stack = StackProcess(output_dir / "local-stack.log", env=env)
    try:
        stack.start()
    except StackStartError as exc:
        print(f"demo FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    results: list[FlowResult] = []
    try:
        print(f"  local stack at {stack.url} (log: {stack.log_path})", flush=True)
        ctx = DemoContext(
            stack=stack,
            api_token=env["SLIDEBRIDGE_API_TOKEN"],
            output_dir=output_dir,
            slide=slide,
            bucket=env["SLIDEBRIDGE_BUCKET_NAME"],
            timeout_s=timeout_s,
            s3=stack.aws_client("s3"),
            sectra_webhook_key=env.get("SLIDEBRIDGE_SECTRA_WEBHOOK_KEY"),
            techcyte_webhook_key=env.get("SLIDEBRIDGE_TECHCYTE_WEBHOOK_KEY"),
        )
        for flow in flows:
            print(f"\n-- flow {flow.name} --", flush=True)
            flow_start = time.monotonic()
            try:
                result = flow.run(ctx)
            except (DemoError, httpx.HTTPError, OSError, KeyError, ValueError) as exc:
                result = FlowResult(flow.name, ok=False, message=f"{type(exc).__name__}: {exc}")
                result.elapsed_s = time.monotonic() - flow_start
            results.append(result)
    finally:
        code = stack.stop()
        if code not in (0, None):
            print(f"warning: the local stack exited with {code} (see {stack.log_path})", file=sys.stderr)
    print_report(results)
    failed = [r.flow for r in results if not r.ok]
    if failed:
        print(
            f"demo FAILED ({', '.join(failed)}) after {time.monotonic() - started:.0f} s; "
            f"the stack's log is {stack.log_path}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(f"demo OK after {time.monotonic() - started:.0f} s; outputs in {output_dir}/", flush=True)
    return 0
