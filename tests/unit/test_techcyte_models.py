"""Techcyte webhook payload (lenient) and results body (strict) models, and the result builders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from slidebridge.analysis import ClassRegion, RegionPolygon
from slidebridge.vendors.techcyte import (
    RUN_MARKER_KEY,
    ResultsPayload,
    ScanResult,
    WebhookPayload,
    decode_global_id,
    describe_validation_error,
    failed_scan_result,
    scan_result,
    task_number,
)
from tests.analyses import COLORS, make_analysis, ring

FIXTURES = Path(__file__).parent.parent / "fixtures" / "techcyte"


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def test_full_payload_prefers_scan_urls_and_keeps_every_dicom_file():
    payload = WebhookPayload.model_validate(load("webhook_full.json"))
    assert payload.task_id == "dGFzazo0MjQy"
    assert payload.task_number == 4242
    assert payload.scan_ids() == ["5550001", "5550002"]
    assert len(payload.urls("5550002")) == 3  # the DICOM series, not just scans' first URL
    assert payload.stain_of("5550001") == "HE"
    assert payload.stain_of("5550002") is None
    assert payload.model is None  # model_name "" means none
    assert payload.jwt_token is not None and payload.jwt_token.get_secret_value().startswith("eyJ")
    assert "eyJ" not in repr(payload)  # the JWT never shows in reprs or logs
    assert "eyJ" not in str(payload.log_context()) and "X-Amz" not in str(payload.log_context())


def test_legacy_debug_payload_falls_back_to_scans():
    payload = WebhookPayload.model_validate(load("webhook_legacy_debug.json"))
    assert payload.jwt_token is None
    assert payload.company_id == "2380941"  # a number is kept as text
    assert payload.model == "he-tissue"
    assert payload.scan_ids() == ["185001"]
    assert payload.urls("185001")[0].endswith("X-Amz-Signature=eee")
    assert payload.task_number == 185714


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("no_task_id.json", "task_id"),
        ("no_scans.json", "no scan"),
        ("scan_without_url.json", "no download URL"),
        ("non_numeric_scan.json", "not numeric"),
    ],
)
def test_payloads_we_cannot_act_on_are_rejected_with_a_clear_message(name: str, expected: str):
    with pytest.raises(ValidationError) as info:
        WebhookPayload.model_validate(load(f"rejected/{name}"))
    message = describe_validation_error(info.value)
    assert expected in message
    assert "eyJ" not in message and "X-Amz" not in message and "eyJ" not in str(info.value)


def test_global_ids():
    assert decode_global_id("dGFzazoxODU3MTQ=") == ("task", 185714)
    assert decode_global_id("aHVtYW5DYXNlOjk5") == ("humanCase", 99)
    assert decode_global_id("not base64!") is None
    assert task_number("185714") == 185714
    assert task_number("aHVtYW5DYXNlOjk5") is None  # a case id is not a task


def test_scan_result_matches_the_wire_format():
    analysis = make_analysis()
    result = scan_result(
        analysis,
        "5550001",
        model_name="he-tissue",
        provider="slidebridge",
        min_tissue_mm2=1.0,
        run_id="run-1",
        headline_class="cellular",
    )
    wire = ResultsPayload(scanResults=[result]).to_wire()
    scan = wire["scanResults"][0]
    assert scan["scanId"] == "5550001"
    assert isinstance(scan["results"]["summary"], str) and "cellular 18 %" in scan["results"]["summary"]
    assert scan["results"][RUN_MARKER_KEY] == "run-1"
    assert scan["qcFailReasons"] == []
    workflow = scan["workflow"]
    assert workflow["ruo"] is True and workflow["model_name"] == "he-tissue" and workflow["provider"] == "slidebridge"
    assert (workflow["key"], workflow["value"]) == ("Cellular fraction", "18 %")
    assert workflow["report"]["type"] == "Basic"
    assert [s["name"] for s in workflow["report"]["segments"]] == ["Tissue", "Cellular"]  # no background
    assert all(isinstance(line["result"], str) for line in workflow["report"]["results"])
    features = scan["geojson"]["features"]
    assert [f["properties"]["annotation_type"] for f in features] == ["tissue", "tissue", "cellular"]
    big = features[0]
    # level-0 px, integers, bbox [x_min, y_min, x_max, y_max], hole kept, rings closed
    assert big["bbox"] == [800, 400, 4800, 2800]
    assert big["geometry"]["type"] == "Polygon" and len(big["geometry"]["coordinates"]) == 2
    assert big["geometry"]["coordinates"][0][0] == big["geometry"]["coordinates"][0][-1]
    assert big["properties"]["color"] == "#1F77B4"
    assert "caseResults" not in wire
    assert "external_url" not in scan["results"]  # absent, never null


def test_insufficient_tissue_is_a_qc_failure_said_first():
    analysis = make_analysis()  # tissue_area_mm2 is small in the helper
    tissue = analysis.summary.tissue_area_mm2
    result = scan_result(analysis, "1", model_name="m", provider="p", min_tissue_mm2=tissue + 5)
    assert result.qcFailReasons == ["insufficient_tissue"]
    assert result.results.summary.startswith("QC failed: insufficient tissue")


def test_failed_scan_result_completes_the_scan_and_says_why():
    result = failed_scan_result("7", "unreadable slide", model_name="m", provider="p", run_id="r")
    wire = ResultsPayload(scanResults=[result]).to_wire()["scanResults"][0]
    assert wire["qcFailReasons"] == ["analysis_failed"]
    assert wire["results"]["summary"].startswith("Analysis failed: unreadable slide")
    assert "geojson" not in wire  # no shapes that could be read as a finding
    assert wire["workflow"]["report"] == {
        "type": "Basic",
        "results": [{"name": "Status", "result": "Analysis failed: unreadable slide"}],
        "segments": [],
    }


def test_feature_budget_keeps_the_largest_polygons_and_says_so():
    regions = [
        ClassRegion(label="background", color=COLORS[0], polygons=[], tile_count=0, area_mm2=0.0),
        ClassRegion(
            label="tissue",
            color=COLORS[1],
            polygons=[
                RegionPolygon(exterior=ring(10 * i, 0, 10 * i + 5 + i, 5), area_mm2=0.001 * (i + 1)) for i in range(5)
            ],
            tile_count=5,
            area_mm2=0.015,
        ),
        ClassRegion(label="cellular", color=COLORS[2], polygons=[], tile_count=0, area_mm2=0.0),
    ]
    result = scan_result(
        make_analysis(regions=regions), "1", model_name="m", provider="p", min_tissue_mm2=0, max_features=2
    )
    assert result.geojson is not None
    assert [f.properties.area_mm2 for f in result.geojson.features] == [0.005, 0.004]
    assert "3 small regions not drawn" in result.results.summary


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: s["geojson"]["features"][0]["properties"].pop("annotation_type"), "annotation_type"),
        (lambda s: s.update(scanId=5550001), "scanId"),
        (lambda s: s["results"].update(summary=3), "summary"),
        (lambda s: s["workflow"].update(ruo="True"), "ruo"),
        (lambda s: s["workflow"]["report"].update(type="Fancy"), "type"),
        (lambda s: s["geojson"]["features"][0].update(bbox=[250, 100, 300, 200]), "bbox"),
        (lambda s: s.update(caseResults={}), "caseResults"),
    ],
)
def test_outbound_model_refuses_what_the_server_would_reject(mutate, expected):
    scan = scan_result(make_analysis(), "1", model_name="m", provider="p", min_tissue_mm2=0).model_dump(mode="json")
    mutate(scan)
    with pytest.raises(ValidationError) as info:
        ScanResult.model_validate(scan)
    assert expected in str(info.value)


def test_one_scan_result_per_scan():
    one = failed_scan_result("1", "x", model_name="m", provider="p")
    with pytest.raises(ValidationError, match="scanId repeats"):
        ResultsPayload(scanResults=[one, one])
