"""Sectra wire models: inbound lenient on every fixture, outbound strict (fixtures: tests/fixtures/sectra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from slidebridge.vendors.sectra import (
    ImageNotification,
    Invocation,
    PatchCollectionContent,
    PatchItem,
    PrimitiveItem,
    PrimitiveResult,
    ResultData,
    ResultPayload,
    ResultPoint,
    ResultPolygon,
    SectraError,
    Style,
    describe_validation_error,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "sectra"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.fixture-callback-token"


def load(relative: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / relative).read_text())
    return data


def names(folder: str) -> list[str]:
    return sorted(p.name for p in (FIXTURES / folder).glob("*.json"))


# --- invocations that parse ---------------------------------------------------------------------


@pytest.mark.parametrize("name", names("invocations"))
def test_every_invocation_fixture_parses_and_hides_the_token(name: str) -> None:
    invocation = Invocation.model_validate(load(f"invocations/{name}"))
    assert invocation.callbackInfo.token.get_secret_value() == TOKEN
    assert TOKEN not in repr(invocation)
    assert TOKEN not in str(invocation.model_dump())
    assert invocation.callbackInfo.url.endswith("/SectraPathologyServer/external/imageanalysis/v1")


def test_whole_slide_create() -> None:
    invocation = Invocation.model_validate(load("invocations/create_whole_slide.json"))
    assert invocation.action == "create"
    assert invocation.input_type == "wholeSlide"
    assert invocation.regions() == []
    assert invocation.context == {"profile": "he-tissue"}
    assert invocation.cancellationToken == "c-7f3e"
    assert invocation.stored_result() is None


def test_tagged_polygon_create_gives_its_polygon_and_chosen_tag() -> None:
    invocation = Invocation.model_validate(load("invocations/create_tagged_polygon.json"))
    assert invocation.input_type == "taggedPolygon"
    assert invocation.regions() == [[(0.20, 0.10), (0.45, 0.12), (0.44, 0.74), (0.21, 0.70)]]
    assert invocation.selected_tag() == "Stroma"


def test_multi_area_create_gives_every_polygon() -> None:
    invocation = Invocation.model_validate(load("invocations/create_multi_area.json"))
    assert invocation.input_type == "multiArea"
    regions = invocation.regions()
    assert [len(r) for r in regions] == [3, 4]
    assert regions[1][2] == (0.90, 0.78)  # y above 0.78 ≤ H/W: normalised by the WIDTH
    assert invocation.selected_tag() is None


def test_cancel_has_no_input() -> None:
    invocation = Invocation.model_validate(load("invocations/cancel.json"))
    assert invocation.action == "cancel"
    assert invocation.input is None
    assert invocation.input_type is None
    assert invocation.stored_result() is None
    assert invocation.cancellationToken == "c-7f3e"


@pytest.mark.parametrize("name", ["modify.json", "delete.json"])
def test_modify_and_delete_carry_the_full_stored_result_with_arcs_and_unknown_fields(name: str) -> None:
    invocation = Invocation.model_validate(load(f"invocations/{name}"))
    stored = invocation.stored_result()
    assert stored is not None
    assert (stored.id, stored.versionId) == (17, "0b6a1d2e-8e0f-4c2a-9a55-3f1f0c0d9e11")
    assert stored.slideId == invocation.slideId
    assert stored.displayProperties["Tiles"] == "812"
    wire = stored.to_wire()
    # Nothing dropped: arcs, polylines and an unknown top-level key survive a round trip.
    assert wire["data"]["result"]["content"][0]["arcs"][0]["radius"] == 0.02
    assert wire["data"]["result"]["content"][0]["polylines"]
    assert wire["createdBy"] == "sectra-user-42"
    assert wire["data"] == load(f"invocations/{name}")["input"]["data"]


def test_context_null_becomes_empty_dict_and_numeric_slide_id_becomes_text() -> None:
    invocation = Invocation.model_validate(load("invocations/create_context_null_no_token.json"))
    assert invocation.context == {}
    assert invocation.cancellationToken is None
    assert invocation.slideId == "4711"
    assert invocation.model_extra == {"requestedBy": {"role": "pathologist"}}


def test_stored_result_with_nulls_everywhere() -> None:
    stored = Invocation.model_validate(load("invocations/delete_attachments_null.json")).stored_result()
    assert stored is not None
    assert stored.id == "18"
    assert stored.attachments is None
    assert stored.displayProperties == {}
    assert stored.data is not None
    assert stored.data["context"] is None


def test_primitive_content_as_a_single_object_is_kept_as_sent() -> None:
    stored = Invocation.model_validate(load("invocations/modify_content_object.json")).stored_result()
    assert stored is not None and stored.data is not None
    content = stored.data["result"]["content"]
    assert isinstance(content, dict)
    assert content["arcs"][0]["endAngle"] == 6.2832


def test_patch_gallery_button_press_arrives_as_modify() -> None:
    stored = Invocation.model_validate(load("invocations/modify_patch_action.json")).stored_result()
    assert stored is not None and stored.data is not None
    actions = stored.data["result"]["content"]["actions"]
    assert [a["state"] for a in actions] == [1]


def test_action_in_upper_case_is_accepted() -> None:
    data = load("invocations/cancel.json") | {"action": "CANCEL"}
    assert Invocation.model_validate(data).action == "cancel"


def test_create_without_input_means_whole_slide() -> None:
    data = load("invocations/create_whole_slide.json")
    del data["input"]
    invocation = Invocation.model_validate(data)
    assert invocation.input_type == "wholeSlide"
    assert invocation.regions() == []


# --- invocations that are refused ---------------------------------------------------------------


@pytest.mark.parametrize("name", names("rejected"))
def test_rejected_fixtures_raise_without_echoing_the_token(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        Invocation.model_validate(load(f"rejected/{name}"))
    for text in (str(info.value), describe_validation_error(info.value)):
        # Not even the (otherwise truncated) head or tail of the token.
        assert "callback-token" not in text and "eyJhbGci" not in text
        assert "input_value" not in text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("missing_action.json", "action"),
        ("unknown_action.json", "action"),
        ("missing_slide_id.json", "slideId"),
        ("missing_application_id.json", "applicationId"),
        ("missing_callback_url.json", "callbackInfo.url"),
        ("tagged_polygon_two_points.json", "at least 3 points"),
        ("tagged_polygon_without_polygon.json", "at least 3 points"),
        ("multi_area_without_polygons.json", "multiArea input needs content.polygons"),
        ("multi_area_empty_polygons.json", "multiArea input needs content.polygons"),
        ("unsupported_input_type.json", "unsupported input type 'wholeCase'"),
        ("modify_stored_result_without_id.json", "id"),
    ],
)
def test_rejections_say_what_is_wrong(name: str, expected: str) -> None:
    with pytest.raises(ValidationError) as info:
        Invocation.model_validate(load(f"rejected/{name}"))
    assert expected in str(info.value)


def test_description_of_a_rejection_names_the_fields() -> None:
    data = load("rejected/missing_slide_id.json") | {"action": "explode"}
    with pytest.raises(ValidationError) as info:
        Invocation.model_validate(data)
    text = describe_validation_error(info.value)
    assert text.startswith("action: Input should be 'create', 'modify', 'cancel' or 'delete'")
    assert "slideId: Field required" in text


def test_fixture_lists_are_not_empty() -> None:
    # The parametrised tests above would silently pass on an empty folder.
    assert len(names("invocations")) >= 10
    assert len(names("rejected")) >= 11
    assert len(names("notifications")) >= 3


# --- image notifications ------------------------------------------------------------------------


def test_image_notification_with_image_info() -> None:
    note = ImageNotification.model_validate(load("notifications/image_notification.json"))
    assert note.imageInfo is not None
    assert note.imageInfo.dimensions == note.imageInfo.require_dimensions() == (100_000, 80_000)
    assert note.imageInfo.micronsPerPixel == 0.25
    assert note.imageInfo.staining_name == "HE"
    assert note.imageInfo.qualityControl is not None
    assert note.imageInfo.qualityControl.versionId == "qc-1"
    assert note.imageInfo.model_extra is not None
    assert note.imageInfo.model_extra["lisSlideId"] == "S24-123 A1 1"
    assert note.cancellationToken is None


def test_image_notification_as_amspath_sends_it() -> None:
    note = ImageNotification.model_validate(load("notifications/image_notification_amspath.json"))
    assert note.cancellationToken == "n-0001"
    assert note.model_extra is not None
    assert note.model_extra["action"] == "newImageFiles"


def test_image_notification_with_little_info() -> None:
    note = ImageNotification.model_validate(load("notifications/image_notification_minimal.json"))
    assert note.context == {}
    assert note.imageInfo is not None
    assert note.imageInfo.dimensions == (51_200, 38_400)
    assert note.imageInfo.staining_name is None
    assert note.imageInfo.micronsPerPixel is None


def test_unknown_size_and_resolution_do_not_reject_a_notification() -> None:
    data = load("notifications/image_notification_minimal.json")
    data["imageInfo"] |= {"imageSize": {"width": 0, "height": 0}, "micronsPerPixel": 0}
    note = ImageNotification.model_validate(data)
    assert note.imageInfo is not None
    assert note.imageInfo.dimensions is None
    assert note.imageInfo.micronsPerPixel is None
    with pytest.raises(SectraError, match="imageSize"):
        note.imageInfo.require_dimensions()


@pytest.mark.parametrize("missing", ["slideId", "applicationId", "callbackInfo"])
def test_image_notification_needs_ids_and_callback(missing: str) -> None:
    data = load("notifications/image_notification.json")
    del data[missing]
    with pytest.raises(ValidationError):
        ImageNotification.model_validate(data)


# --- outbound (strict) --------------------------------------------------------------------------


def _payload(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "slideId": "s1",
        "displayResult": "x",
        "displayProperties": {"k": "v"},
        "applicationVersion": "1.0.0",
        "data": {
            "context": {},
            "result": {
                "type": "primitive",
                "content": [{"polygons": [{"points": [{"x": 0, "y": 0}, {"x": 1, "y": 0}, {"x": 1, "y": 0.5}]}]}],
            },
        },
    }
    body.update(changes)
    return body


def test_outbound_payload_leaves_absent_what_is_none() -> None:
    wire = ResultPayload.model_validate(_payload()).to_wire()
    assert "id" not in wire and "versionId" not in wire
    assert wire["attachments"] == []
    assert wire["data"]["context"] == {}
    assert wire["data"]["result"]["content"] == [
        {"polygons": [{"points": [{"x": 0.0, "y": 0.0}, {"x": 1.0, "y": 0.0}, {"x": 1.0, "y": 0.5}]}]}
    ]
    assert ResultPayload.model_validate(_payload(id=3, versionId="v")).to_wire()["versionId"] == "v"


@pytest.mark.parametrize(
    "bad",
    [
        {"unknown": 1},
        {"displayProperties": {"Tiles": 812}},  # Sectra's model: Record<string, string>
        {"data": {"context": {}, "result": {"type": "primitive", "content": {"polygons": []}}}},  # object form
        {"data": {"context": {}, "result": {"type": "heatmap", "content": []}}},
    ],
)
def test_outbound_payload_is_strict(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ResultPayload.model_validate(_payload(**bad))


def test_outbound_geometry_rules() -> None:
    with pytest.raises(ValidationError):
        ResultPolygon(points=[ResultPoint(x=0, y=0), ResultPoint(x=1, y=1)])
    with pytest.raises(ValidationError):
        ResultPoint(x=float("nan"), y=0)
    with pytest.raises(ValidationError):
        Style(strokeStyle="red")
    assert Style(strokeStyle="#AABBCC", fillStyle="#AABBCC40").fillStyle == "#AABBCC40"


def test_patch_tags_must_exist() -> None:
    square = ResultPolygon(points=[ResultPoint(x=0, y=0), ResultPoint(x=1, y=0), ResultPoint(x=1, y=1)])
    with pytest.raises(ValidationError, match="not an index into tags"):
        PatchCollectionContent(
            description="d",
            polygons=[square],
            patches=[PatchItem(tag=2, position=ResultPoint(x=0.1, y=0.1), sortKeyValue=0.9)],
            tags=["a", "b"],
            patchSize=224,
            magnification=10,
        )


def test_item_fields_that_are_unused_are_absent_on_the_wire() -> None:
    data = ResultData(result=PrimitiveResult(content=[PrimitiveItem(style=Style(strokeStyle="#000000"))]))
    payload = ResultPayload(slideId="s", displayResult="d", applicationVersion="1", data=data)
    assert payload.to_wire()["data"]["result"]["content"] == [{"style": {"strokeStyle": "#000000"}}]
