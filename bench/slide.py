"""Whole slide through ``python -m batch_job`` on this machine (CPU): seconds per stage, tiles/s, peak
RSS, and the share of the tiles + classify stage the classifier spent waiting for tiles.

    python -m bench.slide [--width 100000] [--height 80000] [--size N] [--workers 0]

Defaults to the issue's whole slide, 100 000 × 80 000 px at 0.25 µm/px (about 30 % tissue), generated
once into ``.bench-data/`` (one rendering process per core; some 11 core-minutes, 600 MB) and reused;
``--size N`` for a quick N × N run. Starts the local stack in process (moto on loopback), uploads the
slide, records a run directly in the table and runs the job as a subprocess, sampling the memory of
its whole process tree (the job, the fork server and the tile workers) every 100 ms. Peak RSS is the
largest sum of the processes' resident sets seen, which counts pages they share (the tile workers'
shared-memory batches, libraries) once per process: an upper bound. Peak PSS shares such pages out
among the processes that map them: what the tree really holds. The download stage reads from moto,
which serves the file from Python, so it says little about S3.

No baseline: this prints its own figures only (``make bench`` prints them before its table).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
METRICS = re.compile(r"item metrics (\{.*\})")
DEFAULT_WIDTH, DEFAULT_HEIGHT = 100_000, 80_000
RSS_GOAL_MB = 2048
_SAMPLE_S = 0.1


def stage_seconds(metrics: dict[str, Any]) -> dict[str, float]:
    """The job's seconds per stage as the issue lists them: download, open, tissue, tiles + classify,
    regions (tile results, class polygons, summary), artifacts, delivery.

    The ``item metrics`` line times ``analyse`` as one stage (the dashboard's) and splits it in
    ``analyse_seconds``; a line without that split keeps ``analyse`` whole.
    """
    seconds: dict[str, float] = metrics["seconds"]
    split: dict[str, float] = metrics.get("analyse_seconds") or {}
    names = {"tissue": "tissue", "tiles_classify": "tiles + classify", "regions": "regions"}
    stages: dict[str, float] = {}
    for stage, value in seconds.items():
        if stage == "analyse" and split:
            stages.update({names.get(part, part): part_s for part, part_s in split.items()})
        else:
            stages[stage] = value
    return stages


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _kib(path: Path, field: str) -> int:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", path.read_text(), re.MULTILINE)
    except OSError:  # the process ended meanwhile
        return 0
    return int(match.group(1)) if match else 0


def tree_memory_bytes(root_pid: int) -> tuple[int, int]:
    """(RSS, PSS) summed over ``root_pid`` and its descendants (Linux /proc)."""
    children = _children()
    rss = pss = 0
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        rss += _kib(Path(f"/proc/{pid}/status"), "VmRSS") * 1024
        pss += _kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss") * 1024
        stack.extend(children.get(pid, []))
    return rss, pss


def run(width: int, height: int, workers: int) -> dict[str, object]:
    import boto3  # noqa: PLC0415 - the figures' helpers above import without the AWS stack

    from local.demo import cached_synthetic_slide, upload_slide  # noqa: PLC0415 - after the stack sets AWS env
    from local.stack import LocalStack  # noqa: PLC0415
    from slidebridge.runs import InputArtifact, Item, Run  # noqa: PLC0415
    from slidebridge.settings import get_settings  # noqa: PLC0415
    from slidebridge.store import RunStore  # noqa: PLC0415

    cache = REPO / ".bench-data"
    generated = not any(cache.glob(f"synthetic-{width}x{height}-seed0-mpp0.25.tiff"))
    started = time.perf_counter()
    slide = cached_synthetic_slide(cache, width, height, workers=os.cpu_count() or 1)
    generation = f"{time.perf_counter() - started:.0f} s" if generated else "cached"
    with tempfile.TemporaryDirectory() as data_dir, LocalStack(host="127.0.0.1", port=0, data_dir=Path(data_dir)):
        os.environ["SLIDEBRIDGE_TILE_WORKERS"] = str(workers)
        get_settings.cache_clear()
        settings = get_settings()
        url = upload_slide(boto3.client("s3"), settings.bucket_name, slide.path, "slides/bench.tiff")
        run = Run(application_id="he-tissue", version_number="1.0.0", organization_id="bench", submitted_by="bench")
        item = Item(
            run_id=run.run_id,
            index=0,
            external_id="bench",
            input_artifacts=[InputArtifact(name="whole_slide_image", download_url=url, metadata=slide.metadata())],
        )
        RunStore(settings.table_name).create_run(run, [item])
        peak_rss = peak_pss = 0
        peak_line = ""
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "batch_job", run.run_id], stderr=subprocess.PIPE, text=True, cwd=REPO
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stderr or []), daemon=True)
        reader.start()
        while process.poll() is None:
            rss, pss = tree_memory_bytes(process.pid)
            if rss > peak_rss:
                # The last line the job logged before its peak says roughly where the peak was.
                peak_rss, peak_line = rss, (lines[-1].strip() if lines else "")
            peak_pss = max(peak_pss, pss)
            time.sleep(_SAMPLE_S)
        reader.join()
        wall = time.perf_counter() - started
        if process.returncode != 0:
            sys.stderr.write("".join(lines))
            raise SystemExit(f"batch job exited with {process.returncode}")
        metrics = next((json.loads(m.group(1)) for line in lines if (m := METRICS.search(line))), None)
        if metrics is None:
            sys.stderr.write("".join(lines))
            raise SystemExit("the job printed no item metrics line")
    stages = stage_seconds(metrics)
    classify_s = stages.get("tiles + classify", 0.0)
    wait = metrics.get("classifier_wait_fraction")
    peak_mb = round(peak_rss / 2**20)
    return {
        "slide_px": f"{width}x{height}",
        "slide_mb": round(slide.path.stat().st_size / 1e6, 1),
        "slide_generation": generation,
        "cores": os.cpu_count(),
        "tile_workers": workers or "auto (one per core, at most 8)",
        "tiles": metrics["tiles"],
        **{f"seconds {stage}": value for stage, value in stages.items()},
        "job_wall_s": round(wall, 1),
        "tiles_per_s (tiles + classify)": round(metrics["tiles"] / classify_s, 1) if classify_s else 0.0,
        "classifier_wait_pct": "n/a" if wait is None else round(100.0 * wait, 1),
        "peak_rss_mb (tree sum)": peak_mb,
        "peak_pss_mb (tree)": round(peak_pss / 2**20),
        f"peak_rss under {RSS_GOAL_MB} MB": "yes" if peak_mb < RSS_GOAL_MB else "NO",
        "peak_rss after": re.sub(r"^\S+ \S+ \S+ \S+ run=\S+ ", "", peak_line)[:100],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="slide width in level-0 px")
    parser.add_argument("--height", type=int, default=DEFAULT_HEIGHT, help="slide height in level-0 px")
    parser.add_argument("--size", type=int, help="a square slide of this side instead (quick runs)")
    parser.add_argument("--workers", type=int, default=0, help="tile workers (0 = one per core, at most 8)")
    args = parser.parse_args(argv)
    width, height = (args.size, args.size) if args.size else (args.width, args.height)
    result = run(width, height, args.workers)
    key_width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{key_width}}  {value}")


if __name__ == "__main__":
    main()
