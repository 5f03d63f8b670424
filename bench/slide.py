"""Whole slide through ``python -m batch_job`` on this machine: seconds per stage, tiles/s, peak RSS.

    python -m bench.slide [--size 20000] [--workers 0]

Starts the local stack in process (moto on loopback), uploads a generated H&E-like slide, records a
run directly in the table and runs the job as a subprocess, sampling the resident memory of its
whole process tree (the job plus its tile workers) every 100 ms. Peak RSS is the largest sum seen.
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

import boto3

REPO = Path(__file__).resolve().parent.parent
METRICS = re.compile(r"item metrics (\{.*\})")


def _tree_rss_bytes(root_pid: int) -> int:
    """Sum of RSS over ``root_pid`` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        rss[int(entry.name)] = int(match.group(1)) * 1024 if match else 0
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run(size: int, workers: int) -> dict[str, object]:
    from local.demo import cached_synthetic_slide, upload_slide  # noqa: PLC0415 - after the stack sets AWS env
    from local.stack import LocalStack  # noqa: PLC0415
    from slidebridge.runs import InputArtifact, Item, Run  # noqa: PLC0415
    from slidebridge.settings import get_settings  # noqa: PLC0415
    from slidebridge.store import RunStore  # noqa: PLC0415

    slide = cached_synthetic_slide(REPO / ".bench-data", size, size)
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
        peak = 0
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "batch_job", run.run_id], stderr=subprocess.PIPE, text=True, cwd=REPO
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stderr or []), daemon=True)
        reader.start()
        while process.poll() is None:
            peak = max(peak, _tree_rss_bytes(process.pid))
            time.sleep(0.1)
        reader.join()
        wall = time.perf_counter() - started
        if process.returncode != 0:
            sys.stderr.write("".join(lines))
            raise SystemExit(f"batch job exited with {process.returncode}")
        metrics = next((json.loads(m.group(1)) for line in lines if (m := METRICS.search(line))), None)
        if metrics is None:
            sys.stderr.write("".join(lines))
            raise SystemExit("the job printed no item metrics line")
        return {
            "slide_px": f"{size}x{size}",
            "slide_mb": round(slide.path.stat().st_size / 1e6, 1),
            "cores": os.cpu_count(),
            "tile_workers": workers,
            "tiles": metrics["tiles"],
            "tiles_per_s": metrics["tiles_per_s"],
            "seconds_per_stage": metrics["seconds"],
            "job_wall_s": round(wall, 1),
            "peak_rss_mb": round(peak / 2**20),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20000, help="slide side in level-0 px")
    parser.add_argument("--workers", type=int, default=0, help="tile workers (0 = one per core)")
    args = parser.parse_args()
    result = run(args.size, args.workers)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
