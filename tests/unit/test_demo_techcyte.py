"""The demo's picture and checks of a Techcyte result: level-0 px land on the right thumbnail pixels."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from PIL import Image

from local.demo_techcyte import DemoScan, check_results, lab_view, render_scan_result
from slidebridge.vendors.techcyte import ResultsPayload, scan_result
from tests.analyses import H, W, make_analysis

TISSUE_RGB = (31, 119, 180)  # tests/analyses.py COLORS
CELLULAR_RGB = (214, 39, 40)


def _posted_scan(scan_id: str = "5550001") -> dict[str, Any]:
    """A scanResult exactly as the job posts it (the real builder, on the hand-made 8000 × 3000 analysis)."""
    result = scan_result(
        make_analysis(), scan_id, model_name="slidebridge he-tissue", provider="slidebridge", min_tissue_mm2=1.0
    )
    scan: dict[str, Any] = ResultsPayload(scanResults=[result]).to_wire()["scanResults"][0]
    return scan


def _scans() -> list[DemoScan]:
    return [DemoScan("5550001", "test slide", [Path("slide.tiff")], W, H)]


def _evaluations(*scan_ids: str) -> list[dict[str, Any]]:
    return [{"id": 1, "sample_id": int(s), "case_id": 9, "task_id": 4242, "details": {}} for s in scan_ids]


def _tinted_towards(pixel: tuple[int, int, int], rgb: tuple[int, int, int]) -> bool:
    """Semi-transparent ``rgb`` over white: each channel between the two, and clearly off white."""
    return all(c <= p <= 255 for p, c in zip(pixel, rgb, strict=True)) and pixel != (255, 255, 255)


def test_level0_features_land_on_the_thumbnail_in_their_colour_with_holes_left_open() -> None:
    # Given the 8000 × 3000 px slide shown as an 800 × 300 thumbnail (a tenth on each axis),
    thumbnail = Image.new("RGB", (800, 300), "white")
    # and the posted result: tissue 800..4800 × 400..2800 with a hole 1200..1600 × 800..1200,
    # cellular 5200..7600 × 1200..2900 (level-0 px),
    scan = _posted_scan()
    # when it is drawn,
    picture = render_scan_result(scan, thumbnail, W, H)

    def pixel(xy: tuple[int, int]) -> tuple[int, int, int]:
        r, g, b = picture.getpixel(xy)  # type: ignore[misc]  # an RGB picture: always three channels
        return int(r), int(g), int(b)

    # then the tissue is filled semi-transparently in its colour, a tenth of its level-0 position,
    assert _tinted_towards(pixel((300, 200)), TISSUE_RGB)
    assert pixel((300, 200)) != TISSUE_RGB
    # its outline is solid (left edge at x = 80, and not at Sectra's x/W frame),
    assert pixel((80, 200)) == TISSUE_RGB
    # the hole stays the slide's own white,
    assert pixel((140, 100)) == (255, 255, 255)
    # the cellular region is filled in its colour, and its bottom edge sits at y = 290, below H/W·300,
    assert _tinted_towards(pixel((640, 200)), CELLULAR_RGB)
    assert pixel((640, 290)) == CELLULAR_RGB
    # and the slide outside every feature stays white.
    assert pixel((40, 20)) == (255, 255, 255)
    assert pixel((700, 60)) == (255, 255, 255)
    # The lab's panel (summary, report, legend) is added underneath.
    assert picture.height > thumbnail.height


def test_a_good_result_passes_the_checks_and_reads_as_the_lab_sees_it() -> None:
    scan = _posted_scan()
    assert check_results({"scanResults": [scan]}, _scans(), _evaluations("5550001")) == []
    lines = lab_view(scan)
    assert lines[0] == "summary   Tissue 82 %; cellular 18 %"
    assert "workflow  Tissue area: 3.34 mm²" in lines
    assert "report    Cellular: 18 % of tissue" in lines
    assert "segment   Tissue: 82 % (2 outlines)" in lines
    assert "segment   Cellular: 18 % (1 outline)" in lines
    assert lines[-1] == "QC        pass"


def test_checks_catch_a_missing_scan_a_second_evaluation_and_a_failed_qc() -> None:
    scan = _posted_scan()
    scans = [*_scans(), DemoScan("5550002", "second", [Path("x.dcm")], 2048, 1536)]
    problems = check_results({"scanResults": [scan]}, scans, _evaluations("5550001", "5550001"))
    assert any("expected one for each of ['5550001', '5550002']" in p for p in problems)
    assert any("expected one per scan" in p for p in problems)

    failed = copy.deepcopy(scan)
    failed["qcFailReasons"] = ["insufficient_tissue"]
    assert check_results({"scanResults": [failed]}, _scans(), _evaluations("5550001")) == [
        "scan 5550001: QC did not pass (['insufficient_tissue'])"
    ]
    assert "QC        fail: insufficient_tissue" in lab_view(failed)


def test_checks_catch_coordinates_off_the_slide_or_in_a_normalised_frame() -> None:
    scan = _posted_scan()
    outside = copy.deepcopy(scan)
    outside["geojson"]["features"][0]["geometry"]["coordinates"][0][1] = [W + 50, 400]
    (problem,) = check_results({"scanResults": [outside]}, _scans(), _evaluations("5550001"))
    assert "lie outside the 8000 × 3000 px slide" in problem

    normalised = copy.deepcopy(scan)
    for feature in normalised["geojson"]["features"]:
        feature["geometry"]["coordinates"] = [
            [[x / W, y / W] for x, y in ring] for ring in feature["geometry"]["coordinates"]
        ]
    (problem,) = check_results({"scanResults": [normalised]}, _scans(), _evaluations("5550001"))
    assert "normalised" in problem
