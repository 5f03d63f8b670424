"""The demo's Techcyte flow: the fake Techcyte API plays the lab's Techcyte, the local stack answers.

What a lab would see, step by step. ``FakeTechcyte`` (``local/fake_techcyte.py``, the same fake the tests
use) runs on loopback *before* the stack starts, so that the stack's ``SLIDEBRIDGE_TECHCYTE_API_URL``
and API client id/secret point at it (:func:`techcyte_stack_environment`). The flow then registers an
AI request (a task) with two scans: the demo slide (one TIFF file) and a small DICOM series (one file
per pyramid level, as Techcyte hands out one presigned URL per file); POSTs the webhook body Techcyte
would send to ``{stack}/hooks/techcyte/{key}``, once more to show that a repeated delivery starts
nothing new; and waits until the fake has received the task's results POST. The posted body is kept
(``techcyte-results.json``) and each scan's top-level GeoJSON is drawn on its thumbnail
(``techcyte-result.png`` for the demo slide).

Techcyte coordinates are level-0 pixels (vendors/TECHCYTE.md §9): unlike Sectra's width-normalised
frame, they only need scaling to the thumbnail, per axis.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageColor, ImageDraw

from local.demo import DemoContext, DemoError, FlowResult, PlatformClient, Progress
from local.fake_techcyte import FakeTask, FakeTechcyte
from local.pictures import slide_thumbnail, typeface

__all__ = [
    "DEMO_DICOM",
    "DemoScan",
    "cached_dicom_series",
    "check_results",
    "lab_view",
    "render_scan_result",
    "run_techcyte_flow",
    "start_fake_techcyte",
    "techcyte_stack_environment",
]

# The DICOM series' level-0 size, µm/px and seed: 3.1 × 2.3 mm, above the default 1 mm² tissue floor.
DEMO_DICOM = (6144, 4608, 0.5, 7)
# Scan ids are numeric strings (TECHCYTE.md §2); these are made up for the demo.
_TIFF_SCAN_ID = "5550001"
_DICOM_SCAN_ID = "5550002"
# The fake's bookkeeping is read in-process, so polling often costs nothing.
_POLL_S = 0.5
# After the results POST arrived, how long a (wrong) second POST gets to show up before we count.
_SECOND_POST_GRACE_S = 2.0


@dataclass(frozen=True)
class DemoScan:
    """One scan of the demo task: the file(s) Techcyte serves and what OpenSlide needs to draw it."""

    scan_id: str
    label: str
    files: list[Path]
    width_px: int
    height_px: int

    @property
    def slide_path(self) -> Path:
        # A DICOM series opens through any of its files (OpenSlide finds the siblings).
        return self.files[0]


# --- set-up ----------------------------------------------------------------------------------------


def techcyte_stack_environment(fake: FakeTechcyte) -> dict[str, str]:
    """What the stack must know to post results to ``fake`` (DESIGN §7 "Techcyte API")."""
    return {
        "SLIDEBRIDGE_TECHCYTE_API_URL": fake.base_url,
        "SLIDEBRIDGE_TECHCYTE_CLIENT_ID": fake.client_id,
        "SLIDEBRIDGE_TECHCYTE_CLIENT_SECRET": fake.client_secret,
    }


def start_fake_techcyte(env: dict[str, str], resources: contextlib.ExitStack) -> FakeTechcyte:
    """Start a fake Techcyte (stopped with ``resources``) and point the stack's ``env`` at it."""
    try:
        fake = resources.enter_context(
            FakeTechcyte(client_id="slidebridge-demo", client_secret=secrets.token_urlsafe(24))
        )
    except OSError as exc:
        raise DemoError(f"the fake Techcyte API did not start: {exc}") from exc
    env.update(techcyte_stack_environment(fake))
    return fake


def cached_dicom_series(cache_dir: Path, width: int, height: int, *, seed: int, mpp: float) -> list[Path]:
    """A synthetic DICOM WSI series (one file per level), generated once per parameter set."""
    from local.synthetic import write_synthetic_dicom  # noqa: PLC0415 - numpy/pydicom, only when needed

    folder = cache_dir / f"synthetic-dicom-{width}x{height}-seed{seed}-mpp{mpp:g}"
    if not folder.is_dir():
        # Written under a temporary name first: an interrupted run must not leave a partial "cache".
        partial = folder.with_name(folder.name + ".partial")
        if partial.exists():
            for stale in partial.iterdir():
                stale.unlink()
        write_synthetic_dicom(partial, width, height, seed=seed, mpp=mpp)
        partial.replace(folder)
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise DemoError(f"the cached DICOM series {folder} holds no .dcm file; delete it and run again")
    return files


# --- checking and showing the results -------------------------------------------------------------


def _rings(feature: dict[str, Any]) -> list[list[tuple[float, float]]]:
    geometry = feature.get("geometry") or {}
    if geometry.get("type") != "Polygon":
        return []
    return [[(float(x), float(y)) for x, y in ring] for ring in geometry.get("coordinates") or []]


def check_results(body: dict[str, Any], scans: Sequence[DemoScan], evaluations: Sequence[dict[str, Any]]) -> list[str]:
    """Problems the lab would notice in the task's one results POST and the evaluations it created."""
    problems: list[str] = []
    posted = [scan for scan in body.get("scanResults") or [] if isinstance(scan, dict)]
    expected_ids = [scan.scan_id for scan in scans]
    posted_ids = [str(scan.get("scanId")) for scan in posted]
    if posted_ids != expected_ids:
        problems.append(f"scanResults for scans {posted_ids}, expected one for each of {expected_ids}")
    evaluated = sorted(str(e.get("sample_id")) for e in evaluations)
    if evaluated != sorted(expected_ids):
        problems.append(f"{len(evaluations)} evaluations (scans {evaluated}), expected one per scan")
    by_id = {scan.scan_id: scan for scan in scans}
    for result in posted:
        scan = by_id.get(str(result.get("scanId")))
        if scan is None:
            continue
        summary = str((result.get("results") or {}).get("summary", ""))
        if summary.startswith(("Analysis failed", "QC failed")):
            problems.append(f"scan {scan.scan_id}: {summary}")
        if result.get("qcFailReasons") != []:
            problems.append(f"scan {scan.scan_id}: QC did not pass ({result.get('qcFailReasons')!r})")
        features = (result.get("geojson") or {}).get("features") or []
        if not features and summary != "No tissue detected":
            problems.append(f"scan {scan.scan_id}: no GeoJSON features although tissue was found")
        points = [p for f in features for ring in _rings(f) for p in ring]
        outside = [(x, y) for x, y in points if not (0 <= x <= scan.width_px and 0 <= y <= scan.height_px)]
        if outside:
            problems.append(
                f"scan {scan.scan_id}: {len(outside)} GeoJSON points lie outside the "
                f"{scan.width_px} × {scan.height_px} px slide, e.g. {outside[0]}"
            )
        elif points and max(x for x, _ in points) <= 1.0:
            problems.append(f"scan {scan.scan_id}: the GeoJSON looks normalised, not in level-0 px")
        untyped = [f for f in features if not isinstance((f.get("properties") or {}).get("annotation_type"), str)]
        if untyped:
            problems.append(f"scan {scan.scan_id}: {len(untyped)} features without a string annotation_type")
    return problems


def _qc_text(reasons: Any) -> str:
    # TECHCYTE.md §5.1: absent/null leaves QC alone, [] records a pass, a list records failures.
    if reasons is None:
        return "untouched"
    if reasons == []:
        return "pass"
    return "fail: " + ", ".join(str(r) for r in reasons)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _lab_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(where in Techcyte's AI results panel, what it says) for one scanResult."""
    results = result.get("results") or {}
    workflow = result.get("workflow") or {}
    rows = [("summary", str(results.get("summary", "")))]
    if workflow.get("key") is not None:
        rows.append(("workflow", f"{workflow.get('key')}: {workflow.get('value')}"))
    report = workflow.get("report") or {}
    for line in report.get("results") or []:
        rows.append(("report", f"{line.get('name')}: {line.get('result')}"))
    for segment in report.get("segments") or []:
        count = len((segment.get("feature_collection") or {}).get("features") or [])
        rows.append(("segment", f"{segment.get('name')}: {segment.get('result')} ({_plural(count, 'outline')})"))
    rows.append(("QC", _qc_text(result.get("qcFailReasons"))))
    return rows


def lab_view(result: dict[str, Any]) -> list[str]:
    """What Techcyte's AI results panel shows for one scanResult, as aligned text lines."""
    return [f"{where:<9} {text}" for where, text in _lab_rows(result)]


_DEFAULT_COLOR = (255, 255, 0)
_FILL_ALPHA = 80  # of 255: the tissue stays visible under the fill


def _rgb(value: Any) -> tuple[int, int, int]:
    if not isinstance(value, str) or not value:
        return _DEFAULT_COLOR
    try:
        rgba = ImageColor.getrgb(value)
    except ValueError:
        return _DEFAULT_COLOR
    return rgba[0], rgba[1], rgba[2]


def _panel(width: int, result: dict[str, Any], legend: dict[str, tuple[tuple[int, int, int], int]]) -> Image.Image:
    """The AI results panel as a strip under the slide: summary, headline pair, report, QC, legend."""
    font_px = max(12, round(width / 80))
    title, font = typeface(round(font_px * 1.2)), typeface(font_px)
    line_px = round(font_px * 1.5)
    margin = font_px
    # The summary is the title and the workflow's key/value pair the headline under it (in black);
    # report lines as they are, the rest named.
    rows = [
        (text if where in ("report", "workflow") else f"{where}: {text}", "black" if where == "workflow" else "#3c3c3c")
        for where, text in _lab_rows(result)[1:]
    ]
    swatch = font_px
    height = margin * 2 + round(line_px * 1.4) + (len(rows) + len(legend)) * line_px
    panel = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(panel)
    summary = str((result.get("results") or {}).get("summary", ""))
    draw.text((margin, margin), title.fit(summary), fill="black", font=title.font)
    top = margin + round(line_px * 1.4)
    for index, (row, fill) in enumerate(rows):
        draw.text((margin, top + index * line_px), font.fit(row), fill=fill, font=font.font)
    top += len(rows) * line_px
    for index, (annotation_type, (color, count)) in enumerate(legend.items()):
        y = top + index * line_px
        draw.rectangle((margin, y + 2, margin + swatch, y + 2 + swatch), fill=color, outline=color)
        text = f"annotation_type {annotation_type}: {_plural(count, 'feature')}"
        draw.text((margin + swatch + margin // 2, y), font.fit(text), fill=(60, 60, 60), font=font.font)
    return panel


def render_scan_result(
    result: dict[str, Any], thumbnail: Image.Image, slide_width_px: int, slide_height_px: int
) -> Image.Image:
    """The thumbnail with the scanResult's top-level GeoJSON on it, and its panel underneath.

    Positions are level-0 px (TECHCYTE.md §9); they become thumbnail px by the per-axis ratio of the
    sizes. Each feature is drawn in its ``properties.color``: the fill semi-transparent (holes left
    open), the outline solid.
    """
    base = thumbnail.convert("RGBA")
    sx, sy = base.width / slide_width_px, base.height / slide_height_px
    line_px = max(2, round(base.width / 700))
    # One coverage mask per colour, so that holes can be cut out of their polygon's fill and
    # overlapping features of one class do not darken each other.
    masks: dict[tuple[int, int, int], Image.Image] = {}
    lines = Image.new("RGBA", base.size, (0, 0, 0, 0))
    line_draw = ImageDraw.Draw(lines)
    legend: dict[str, tuple[tuple[int, int, int], int]] = {}
    for feature in (result.get("geojson") or {}).get("features") or []:
        properties = feature.get("properties") or {}
        color = _rgb(properties.get("color"))
        annotation_type = str(properties.get("annotation_type"))
        legend[annotation_type] = (color, legend.get(annotation_type, (color, 0))[1] + 1)
        rings = [[(x * sx, y * sy) for x, y in ring] for ring in _rings(feature)]
        rings = [ring for ring in rings if len(ring) >= 3]
        if not rings:
            continue
        mask = masks.setdefault(color, Image.new("L", base.size, 0))
        mask_draw = ImageDraw.Draw(mask)
        mask_draw.polygon(rings[0], fill=255)
        for hole in rings[1:]:
            mask_draw.polygon(hole, fill=0)
        for ring in rings:
            line_draw.line([*ring, ring[0]], fill=(*color, 255), width=line_px, joint="curve")
    picture = base
    for color, mask in masks.items():
        layer = Image.new("RGBA", base.size, (*color, 0))
        layer.putalpha(mask.point(lambda v: _FILL_ALPHA if v else 0))
        picture = Image.alpha_composite(picture, layer)
    picture = Image.alpha_composite(picture, lines)
    panel = _panel(picture.width, result, legend)
    out = Image.new("RGB", (picture.width, picture.height + panel.height), "white")
    out.paste(picture.convert("RGB"), (0, 0))
    out.paste(panel, (0, picture.height))
    return out


# --- the flow -------------------------------------------------------------------------------------


def _demo_scans(ctx: DemoContext) -> list[DemoScan]:
    width, height, mpp, seed = DEMO_DICOM
    series = cached_dicom_series(ctx.output_dir / "cache", width, height, seed=seed, mpp=mpp)
    return [
        DemoScan(_TIFF_SCAN_ID, "demo slide, TIFF", [ctx.slide.path], ctx.slide.width_px, ctx.slide.height_px),
        DemoScan(_DICOM_SCAN_ID, f"DICOM series, {len(series)} files", series, width, height),
    ]


def _post_webhook(http: httpx.Client, hook: str, payload: dict[str, Any]) -> tuple[dict[str, Any], float]:
    sent = time.monotonic()
    answer = http.post(hook, json=payload)
    elapsed = time.monotonic() - sent
    if answer.status_code != 200:
        raise DemoError(f"the Techcyte webhook answered {answer.status_code}: {answer.text[:1000]}")
    body = answer.json()
    if not isinstance(body, dict) or not body.get("run_id"):
        raise DemoError(f"the Techcyte webhook answered {body!r}, not {{'message': 'accepted', 'run_id': ...}}")
    return body, elapsed


def _posts_of(fake: FakeTechcyte, task: FakeTask) -> list[dict[str, Any]]:
    return [body for number, body in list(fake.posts) if number == task.number]


def _wait_for_results(
    fake: FakeTechcyte, task: FakeTask, client: PlatformClient, run_id: str, *, timeout_s: float, log_path: Path
) -> None:
    """Poll the fake until the task's results POST arrived; shows the run as the Platform API sees it."""
    progress = Progress("techcyte")
    start = time.monotonic()
    terminated_at: float | None = None
    while not _posts_of(fake, task):
        elapsed = time.monotonic() - start
        rejected = [reason for number, reason in list(fake.rejected) if number == task.number]
        if rejected:
            raise DemoError(f"Techcyte refused the results POST: {rejected[-1]} (the stack's log is {log_path})")
        run = client.get_run(run_id)
        progress(run, [], elapsed)
        if run["state"] == "TERMINATED" and terminated_at is None:
            terminated_at = elapsed
        # The last scan's job posts right after the run ends; a run long over without a POST failed to.
        if terminated_at is not None and elapsed - terminated_at > 30:
            raise DemoError(
                f"run {run_id} ended {run.get('termination_reason')} but no results reached Techcyte "
                f"(the stack's log is {log_path})"
            )
        if elapsed > timeout_s:
            raise DemoError(f"no Techcyte results for run {run_id} after {timeout_s:.0f} s ({log_path})")
        time.sleep(_POLL_S)


def run_techcyte_flow(ctx: DemoContext, fake: FakeTechcyte, name: str = "techcyte") -> FlowResult:
    """Send an AI request as Techcyte would, wait for the one results POST, check it and draw it."""
    start = time.monotonic()
    if not ctx.techcyte_webhook_key:
        raise DemoError("no Techcyte webhook key (SLIDEBRIDGE_TECHCYTE_WEBHOOK_KEY) for the local stack")
    hook = f"{ctx.stack.url}/hooks/techcyte/{ctx.techcyte_webhook_key}"
    scans = _demo_scans(ctx)
    files: dict[str, list[bytes | Path]] = {scan.scan_id: [*scan.files] for scan in scans}
    task = fake.add_task(
        files,
        stains={scan.scan_id: {"value": "HE", "stain_code": "HE", "label": "H&E"} for scan in scans},
    )
    print(f"  [techcyte] fake Techcyte API at {fake.base_url}; task {task.task_id} (task:{task.number})", flush=True)
    for scan in scans:
        print(f"  [techcyte]   scan {scan.scan_id}: {scan.label}, {scan.width_px} × {scan.height_px} px", flush=True)
    payload = fake.webhook_payload(task)
    # trust_env=False: loopback only, never through a proxy from the environment.
    with httpx.Client(timeout=30.0, trust_env=False) as http, PlatformClient(ctx.stack.url, ctx.api_token) as client:
        sent_at = time.monotonic()
        accepted, took = _post_webhook(http, hook, payload)
        run_id = str(accepted["run_id"])
        print(f"  [techcyte] webhook answered 200 in {took:.2f} s: {json.dumps(accepted)}", flush=True)
        # Techcyte's retry policy is unknown (TECHCYTE.md §2): a second delivery must start nothing.
        again, _ = _post_webhook(http, hook, payload)
        print(f"  [techcyte] the same webhook again: run {again['run_id']} (no second run)", flush=True)
        _wait_for_results(fake, task, client, run_id, timeout_s=ctx.timeout_s, log_path=ctx.stack.log_path)
        result_after_s = time.monotonic() - sent_at
        print(f"  [techcyte] {result_after_s:6.1f} s  results POST received by Techcyte", flush=True)
        time.sleep(_SECOND_POST_GRACE_S)
        run = client.get_run(run_id)
    posts = _posts_of(fake, task)
    body = posts[0]
    dest = ctx.output_dir / f"{name}-results.json"
    dest.write_text(json.dumps(body, indent=2, ensure_ascii=False))
    print(f"  [techcyte] the posted body is in {dest}", flush=True)

    problems: list[str] = []
    if again["run_id"] != run_id:
        problems.append(f"the repeated webhook started run {again['run_id']}, not {run_id} again")
    if len(posts) != 1:
        problems.append(f"{len(posts)} results POSTs for the task, expected exactly one")
    if run.get("termination_reason") != "ALL_ITEMS_PROCESSED":
        problems.append(f"run ended {run.get('termination_reason')}")
    evaluations = fake.evaluations_of(task)
    problems += check_results(body, scans, evaluations)
    incomplete = [scan.scan_id for scan in task.scans.values() if not scan.complete]
    if incomplete:
        problems.append(f"scans {incomplete} are not complete in Techcyte")

    by_id = {str(r.get("scanId")): r for r in body.get("scanResults") or [] if isinstance(r, dict)}
    outcome = FlowResult(name, ok=False, run_id=run_id, run_wall_time_s=result_after_s)
    for scan in scans:
        scan_result = by_id.get(scan.scan_id)
        if scan_result is None:
            continue
        print(f"  [techcyte] what the lab sees on scan {scan.scan_id} ({scan.label}):", flush=True)
        for line in lab_view(scan_result):
            print(f"  [techcyte]   {line}", flush=True)
        workflow = scan_result.get("workflow") or {}
        summary = str((scan_result.get("results") or {}).get("summary", ""))
        if outcome.headline is None:
            outcome.headline = f"scan {scan.scan_id}: {summary}"
        else:
            outcome.display_properties[f"scan {scan.scan_id} summary"] = summary
        if workflow.get("key") is not None:
            outcome.display_properties[f"scan {scan.scan_id} {workflow['key']}"] = workflow.get("value")
        outcome.display_properties[f"scan {scan.scan_id} QC"] = _qc_text(scan_result.get("qcFailReasons"))
        features = (scan_result.get("geojson") or {}).get("features") or []
        outcome.display_properties[f"scan {scan.scan_id} outlines"] = f"{len(features)} GeoJSON features"
        suffix = "" if scan.scan_id == _TIFF_SCAN_ID else f"-scan-{scan.scan_id}"
        picture = ctx.output_dir / f"{name}-result{suffix}.png"
        render_scan_result(scan_result, slide_thumbnail(scan.slide_path), scan.width_px, scan.height_px).save(picture)
        outcome.images.append(picture)
    outcome.ok = not problems
    outcome.message = "; ".join(problems) or (
        f"task {task.task_id}: one results POST, {len(evaluations)} evaluations ({len(scans)} scans), "
        f"run {run_id} {run.get('termination_reason')}"
    )
    outcome.elapsed_s = time.monotonic() - start
    return outcome
