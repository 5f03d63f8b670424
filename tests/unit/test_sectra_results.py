"""Sectra result builders: coordinates divided by the slide WIDTH, texts, styles, patch gallery."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from sectra_client.mock_server import MockSectraServer
from sectra_client.schemas.results import AdaptedResult, Result

from slidebridge.analysis import ClassRegion, RegionPolygon
from slidebridge.outbound import OutboundPolicy, Purpose
from slidebridge.vendors.sectra import (
    PatchCollectionResult,
    PrimitiveResult,
    ResultPayload,
    SectraClient,
    message_result,
    patch_collection_result,
    placeholder_result,
    primitive_result,
    progress_result,
    regions_to_level0,
)
from tests.analyses import CLASSES, COLORS, TILE, H, W, make_analysis, ring


def points_of(wire: dict[str, Any]) -> list[tuple[float, float]]:
    found: list[tuple[float, float]] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if set(node) == {"x", "y"}:
                found.append((node["x"], node["y"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(wire["data"])
    return found


def primitive(payload: ResultPayload) -> PrimitiveResult:
    assert isinstance(payload.data.result, PrimitiveResult)
    return payload.data.result


def test_mock_models_accept_every_builder_output() -> None:
    """amspath's strict models are what the MockSectraServer validates POST/PUT bodies with."""
    analysis = make_analysis()
    payloads = [
        placeholder_result("s1", W, H, application_version="1.0.0"),
        progress_result("s1", W, H, application_version="1.0.0", progress_pct=40),
        message_result("s1", W, H, application_version="1.0.0", text="Analysis cancelled"),
        primitive_result(analysis, "s1", application_version="1.0.0", context={"run_id": "r1"}),
        patch_collection_result(analysis, "s1", application_version="1.0.0"),
    ]
    for payload in payloads:
        wire = payload.to_wire()
        assert Result.model_validate(wire).slideId == "s1"
        assert AdaptedResult.model_validate(wire | {"id": 3, "versionId": "v1"}).versionId == "v1"


@pytest.fixture(scope="module")
def mock_server() -> Iterator[MockSectraServer]:
    server = MockSectraServer(token="t0k")
    with server.run(port=0, host="127.0.0.1"):
        yield server


def test_mock_server_stores_every_builder_output_over_http(mock_server: MockSectraServer) -> None:
    """POST then PUT each kind of result through our client: the mock answers 422 to any shape its
    (amspath's strict) models refuse, which the client would raise as a SectraError."""
    analysis = make_analysis()
    policy = OutboundPolicy({Purpose.SECTRA_CALLBACK: ["127.0.0.1"]})
    with SectraClient(mock_server.url, "t0k", policy=policy, backoff_s=0) as client:
        for kind, payload in [
            ("primitive", primitive_result(analysis, "s-prim", application_version="1.0.0", context={"run": "r1"})),
            ("gallery", patch_collection_result(analysis, "s-gallery", application_version="1.0.0")),
        ]:
            created = client.create_result("he-tissue", payload)
            updated = client.update_result(
                "he-tissue", created.id, payload.model_copy(update={"versionId": created.versionId})
            )
            (kept,) = mock_server.get_results("he-tissue", payload.slideId)
            assert kept.id == created.id == updated.id, kind
            assert kept.displayResult == "Tissue 82 % · cellular 18 %"
            assert kept.data.result.type.value == payload.data.result.type
            assert kept.displayProperties == payload.displayProperties


# --- placeholder, progress, messages ------------------------------------------------------------


def test_placeholder_is_the_whole_slide_rectangle_normalised_by_width() -> None:
    payload = placeholder_result("s1", W, H, application_version="1.2.3", context={"profile": "he"})
    (item,) = primitive(payload).content
    assert item.polygons is not None and item.labels is not None
    corners = [(p.x, p.y) for p in item.polygons[0].points]
    assert corners == [(0.0, 0.0), (1.0, 0.0), (1.0, 0.375), (0.0, 0.375)]
    assert item.labels[0].label == "Analysis queued"
    assert (item.labels[0].location.x, item.labels[0].location.y) == (0.0, 0.0)
    assert payload.displayResult == "Analysis queued"
    assert payload.displayProperties == {"Progress": "0 %"}
    assert payload.applicationVersion == "1.2.3"
    assert payload.data.context == {"profile": "he"}
    wire = payload.to_wire()
    assert "id" not in wire and "versionId" not in wire


def test_progress_text_and_property() -> None:
    payload = progress_result("s1", W, H, application_version="1", progress_pct=39.6)
    assert payload.displayResult == "Analysing… 40 %"
    assert payload.displayProperties == {"Progress": "40 %"}
    assert primitive(payload).content[0].labels[0].label == "Analysing… 40 %"  # type: ignore[index]
    clamped = progress_result("s1", W, H, application_version="1", progress_pct=250, text="Reading slide")
    assert (clamped.displayResult, clamped.displayProperties["Progress"]) == ("Reading slide", "100 %")


@pytest.mark.parametrize(
    "text",
    [
        "Analysis cancelled",
        "Analysis failed: unsupported file format (.mrxs)",
        "Analysis failed: system error, ref 4f2a",
    ],
)
def test_message_results(text: str) -> None:
    payload = message_result("s1", W, H, application_version="1", text=text)
    assert payload.displayResult == text
    assert payload.displayProperties == {"Status": text}
    item = primitive(payload).content[0]
    assert item.labels is not None and item.labels[0].label == text
    assert item.polygons is not None and max(p.y for p in item.polygons[0].points) == 0.375


def test_long_message_is_shortened_to_one_line() -> None:
    payload = message_result("s1", W, H, application_version="1", text="Analysis failed:\n" + "x" * 500)
    assert len(payload.displayResult) == 200
    assert "\n" not in payload.displayResult
    assert payload.displayResult.endswith("…")


def test_builders_refuse_nonsense_sizes_and_colours() -> None:
    with pytest.raises(ValueError, match="positive"):
        placeholder_result("s1", 0, H, application_version="1")
    with pytest.raises(ValueError, match="color"):
        message_result("s1", W, H, application_version="1", text="x", color="red")


# --- primitive result from an analysis ----------------------------------------------------------


def test_primitive_result_coordinates_are_divided_by_width_for_x_and_y() -> None:
    payload = primitive_result(make_analysis(), "s1", application_version="1.0.0")
    points = points_of(payload.to_wire())
    assert points
    assert all(0 <= x <= 1 and 0 <= y <= H / W for x, y in points)
    tissue = primitive(payload).content[0]
    assert tissue.polygons is not None
    first = [(p.x, p.y) for p in tissue.polygons[0].points]
    # ring(800, 400, 4800, 2800) without its closing point, each coordinate / 8000.
    assert first == [(0.1, 0.05), (0.6, 0.05), (0.6, 0.35), (0.1, 0.35)]
    assert regions_to_level0([first], W) == [[(800.0, 400.0), (4800.0, 400.0), (4800.0, 2800.0), (800.0, 2800.0)]]


def test_primitive_result_one_styled_item_per_foreground_class() -> None:
    payload = primitive_result(make_analysis(), "s1", application_version="1.0.0")
    items = primitive(payload).content
    styled = [item for item in items if item.style is not None]
    assert [(i.style.strokeStyle, i.style.fillStyle) for i in styled if i.style] == [
        ("#1F77B4", "#1F77B440"),
        ("#D62728", "#D6272840"),
    ]
    tissue, cellular = styled
    assert tissue.polygons is not None and len(tissue.polygons) == 2
    # The hole is outlined as a closed polyline.
    assert tissue.polylines is not None and len(tissue.polylines) == 1
    hole = [(p.x, p.y) for p in tissue.polylines[0].points]
    assert hole[0] == hole[-1] and set(hole) == {(0.15, 0.1), (0.2, 0.1), (0.2, 0.15), (0.15, 0.15)}
    # Class name at each polygon's top-left, largest polygon first.
    assert tissue.labels is not None
    assert [(lab.label, lab.location.x, lab.location.y) for lab in tissue.labels] == [
        ("tissue", 0.1, 0.05),
        ("tissue", 0.75, 0.025),
    ]
    assert cellular.polylines is None  # absent on the wire, not an empty list
    assert "polylines" not in payload.to_wire()["data"]["result"]["content"][1]


def test_primitive_result_headline_and_properties() -> None:
    payload = primitive_result(make_analysis(), "s1", application_version="1.0.0", context={"run_id": "r1"})
    assert payload.displayResult == "Tissue 82 % · cellular 18 %"
    assert primitive(payload).content[-1].labels[0].label == payload.displayResult  # type: ignore[index]
    props = payload.displayProperties
    assert props["Tissue area"] == "3.34 mm²"
    assert props["Analysed area"] == "6.00 mm²"
    assert props["Tissue"] == "82 % of tissue"
    assert props["Cellular"] == "18 % of tissue"
    assert props["Tiles"] == str(len(make_analysis().tiles))
    assert props["Model"] == "he-tissue 1.0.0"
    assert "Outlines" not in props
    assert all(isinstance(v, str) for v in props.values())
    assert payload.data.context == {"run_id": "r1"}


def test_headline_without_tissue() -> None:
    analysis = make_analysis(fractions={}, regions=[])
    payload = primitive_result(analysis, "s1", application_version="1.0.0")
    assert payload.displayResult == "No tissue detected"
    assert [item.labels[0].label for item in primitive(payload).content if item.labels] == ["No tissue detected"]


def test_tiny_fraction_is_not_shown_as_zero() -> None:
    analysis = make_analysis(fractions={"tissue": 0.997, "cellular": 0.003})
    assert primitive_result(analysis, "s", application_version="1").displayResult == "Tissue 100 % · cellular <1 %"


def test_huge_outlines_are_simplified_and_the_result_says_so() -> None:
    # A circle with 12 000 vertices (radius 1200 px) and 300 tiny squares.
    circle = [
        (4000 + 1200 * math.cos(2 * math.pi * k / 12_000), 1500 + 1200 * math.sin(2 * math.pi * k / 12_000))
        for k in range(12_000)
    ]
    circle.append(circle[0])
    dots = [RegionPolygon(exterior=ring(x, 100, x + 4, 104), area_mm2=0.0) for x in range(0, 7800, 26)]
    regions = [
        ClassRegion(
            label="tissue",
            color=COLORS[1],
            polygons=[RegionPolygon(exterior=circle, area_mm2=1.1)],
            tile_count=1,
            area_mm2=1.1,
        ),
        ClassRegion(label="cellular", color=COLORS[2], polygons=dots, tile_count=1, area_mm2=0.01),
    ]
    payload = primitive_result(make_analysis(regions=regions), "s1", application_version="1", max_points=500)
    styled = [item for item in primitive(payload).content if item.style is not None]
    total = sum(len(poly.points) for item in styled for poly in item.polygons or [])
    assert 3 <= total <= 500
    assert "simplified" in payload.displayProperties["Outlines"]
    # The circle survives as a recognisable polygon: every vertex stays on it, within tolerance.
    tissue_points = [(p.x * W, p.y * W) for p in styled[0].polygons[0].points]  # type: ignore[index]
    assert len(tissue_points) >= 8
    assert all(abs(math.dist(pt, (4000, 1500)) - 1200) < 1 for pt in tissue_points)


# --- patch gallery ------------------------------------------------------------------------------


def test_patch_collection_tags_positions_and_confidence() -> None:
    analysis = make_analysis()
    payload = patch_collection_result(analysis, "s1", application_version="1.0.0", per_class=3)
    assert isinstance(payload.data.result, PatchCollectionResult)
    content = payload.data.result.content
    assert content.tags == ["tissue", "cellular"]
    assert content.patchSize == 224
    assert content.magnification == 10.0  # 1.0 µm/px ≙ 10×
    assert len(content.patches) == 6
    for tag, name in enumerate(content.tags):
        chosen = [p for p in content.patches if p.tag == tag]
        k = CLASSES.index(name)
        candidates = sorted((t.probabilities[k] for t in analysis.tiles if t.label == name), reverse=True)
        assert [p.sortKeyValue for p in chosen] == pytest.approx(candidates[:3])
        for patch in chosen:
            # Position = the tile centre / W (x and y), so it maps back onto a tile of that class.
            cx, cy = patch.position.x * W, patch.position.y * W
            tile = next(t for t in analysis.tiles if t.x < cx < t.x + t.width and t.y < cy < t.y + t.height)
            assert (cx, cy) == pytest.approx((tile.x + TILE / 2, tile.y + TILE / 2))
            assert tile.label == name
            assert patch.position.y <= H / W
    assert content.polygons  # the foreground outlines
    assert payload.displayResult == "Tissue 82 % · cellular 18 %"


def test_patch_collection_without_regions_still_has_a_polygon() -> None:
    payload = patch_collection_result(make_analysis(regions=[]), "s1", application_version="1.0.0")
    assert isinstance(payload.data.result, PatchCollectionResult)
    polygons = payload.data.result.content.polygons
    assert [(p.x, p.y) for p in polygons[0].points] == [(0.0, 0.0), (1.0, 0.0), (1.0, 0.375), (0.0, 0.375)]
    assert payload.to_wire()["data"]["result"]["content"]["actions"] == []


def test_regions_to_level0_multiplies_both_by_width() -> None:
    assert regions_to_level0([[(0.5, 0.25), (1.0, 0.375)]], 8000) == [[(4000.0, 2000.0), (8000.0, 3000.0)]]
    with pytest.raises(ValueError):
        regions_to_level0([], 0)
