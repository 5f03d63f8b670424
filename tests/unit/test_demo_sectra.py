"""The demo's picture of a Sectra result: Sectra coordinates land on the right thumbnail pixels."""

from __future__ import annotations

from PIL import Image

from local.demo_sectra import level0_from_sectra, render_result


def test_sectra_coordinates_are_divided_by_width_on_both_axes() -> None:
    # A 4000 × 2000 slide: y runs to H/W = 0.5 in Sectra coordinates.
    assert level0_from_sectra(1.0, 0.5, 4000) == (4000.0, 2000.0)
    assert level0_from_sectra(0.25, 0.25, 4000) == (1000.0, 1000.0)


def test_a_polygon_is_drawn_where_it_lies_on_a_non_square_slide() -> None:
    # Given a 4000 × 2000 slide shown as a 400 × 200 thumbnail,
    thumbnail = Image.new("RGB", (400, 200), "white")
    # and a red square from level-0 (1000, 1000) to (2000, 1800), in Sectra coordinates (÷ 4000),
    square = [(0.25, 0.25), (0.5, 0.25), (0.5, 0.45), (0.25, 0.45)]
    result = {
        "displayResult": "test",
        "displayProperties": {},
        "data": {
            "result": {
                "type": "primitive",
                "content": [
                    {
                        "style": {"strokeStyle": "#ff0000", "fillStyle": "#ff000040"},
                        "polygons": [{"points": [{"x": x, "y": y} for x, y in square]}],
                    }
                ],
            }
        },
    }
    # When the result is rendered,
    picture = render_result(result, thumbnail, 4000, 2000).convert("RGB")
    # then its left edge is red at thumbnail x = 100 between y = 100 and 180,
    red_hits = [y for y in range(100, 180) if picture.getpixel((100, y))[0] > 200 > picture.getpixel((100, y))[1]]
    assert len(red_hits) > 60
    # and the slide outside the square stays white.
    assert picture.getpixel((50, 50)) == (255, 255, 255)
    assert picture.getpixel((300, 50)) == (255, 255, 255)
