"""The synthetic slide writer renders in worker processes without changing a byte of the file."""

from __future__ import annotations

from pathlib import Path

from local.synthetic import write_synthetic_slide


def test_rendering_in_workers_writes_the_same_file(tmp_path: Path) -> None:
    # Two levels (1300 × 1100 and 325 × 275) with ragged edge tiles, both rendered through the pool.
    alone = write_synthetic_slide(tmp_path / "one.svs", 1300, 1100, seed=9, mpp=0.5, tile=128)
    pooled = write_synthetic_slide(tmp_path / "two.svs", 1300, 1100, seed=9, mpp=0.5, tile=128, workers=2)
    assert alone.stat().st_size > 10_000
    assert pooled.read_bytes() == alone.read_bytes()
