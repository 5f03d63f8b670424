"""The classifier registry and the default he-tissue classifier on white, pink and purple tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from batch_job.classifiers import Classifier, available_classifiers, get_classifier
from batch_job.classifiers.he_tissue import HeTissueClassifier
from local.synthetic import SyntheticTissue
from slidebridge.errors import NotFoundError

BACKGROUND, TISSUE, CELLULAR = 0, 1, 2


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return get_classifier("he-tissue", "1.0.0", device="cpu")


def test_default_application_is_registered(classifier: Classifier):
    assert ("he-tissue", "1.0.0") in available_classifiers()
    assert isinstance(classifier, Classifier)
    assert (classifier.application_id, classifier.version) == ("he-tissue", "1.0.0")
    assert (classifier.tile_px, classifier.mpp) == (224, 1.0)
    assert classifier.class_names == ("background", "tissue", "cellular")
    assert classifier.background_class == "background"
    assert len(classifier.class_colors) == 3
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in classifier.class_colors)


def test_unknown_application_or_version_is_not_found():
    with pytest.raises(NotFoundError, match=r"he-tissue:9\.9\.9"):
        get_classifier("he-tissue", "9.9.9")
    with pytest.raises(NotFoundError):
        get_classifier("no-such-app", "1.0.0")


def _tiles_from_model(kind: str, count: int) -> NDArray[np.uint8]:
    """224 px tiles at 1 µm/px rendered from a synthetic slide where the ground truth is ``kind``."""
    model = SyntheticTissue(8192, 8192, seed=11, mpp=0.5)
    tile0 = 448  # level-0 px of a 224 µm tile at 0.5 µm/px
    tissue = model.tissue_truth(tile0 / 8)
    cellular = model.cellular_truth(tile0 / 8)
    tiles = []
    for row in range(0, tissue.shape[0] - 8, 8):
        for col in range(0, tissue.shape[1] - 8, 8):
            window_t, window_c = tissue[row : row + 8, col : col + 8], cellular[row : row + 8, col : col + 8]
            wanted = {
                "glass": not window_t.any(),
                "stroma": window_t.all() and not window_c.any(),
                "dense": window_c.all(),
            }[kind]
            if wanted:
                # Rendered at downsample 2, i.e. already at the classifier's 1 µm/px.
                tiles.append(model.render(col * tile0 / 8, row * tile0 / 8, 224, 224, 2.0))
            if len(tiles) == count:
                return np.stack(tiles)
    raise AssertionError(f"the synthetic slide has fewer than {count} {kind} tiles")


@pytest.mark.parametrize(("kind", "expected"), [("glass", BACKGROUND), ("stroma", TISSUE), ("dense", CELLULAR)])
def test_synthetic_glass_stroma_and_dense_tissue_get_their_classes(classifier: Classifier, kind: str, expected: int):
    tiles = _tiles_from_model(kind, 6)
    probabilities = classifier.predict(tiles)
    assert probabilities.dtype == np.float32
    assert probabilities.shape == (6, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert list(probabilities.argmax(axis=1)) == [expected] * 6
    assert probabilities[:, expected].min() > 0.8


def _he_tile(rng: np.random.Generator, nucleus_share: float) -> NDArray[np.uint8]:
    """A tile in typical real H&E colours: eosin-pink stroma with round purple nuclei covering
    about ``nucleus_share`` of it."""
    tile = np.empty((224, 224, 3), np.float32)
    tile[:] = (232, 165, 200)
    yy, xx = np.mgrid[0:224, 0:224]
    radius = 4.0  # px at 1 µm/px: an 8 µm nucleus
    count = int(nucleus_share * 224 * 224 / (np.pi * radius**2))
    for cx, cy in rng.uniform(0, 224, size=(count, 2)):
        tile[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = (95, 65, 145)
    tile += rng.normal(0, 4, tile.shape)
    return np.clip(tile, 0, 255).astype(np.uint8)


def test_real_he_colours_stroma_versus_crowded_nuclei(classifier: Classifier):
    rng = np.random.default_rng(0)
    stroma = np.stack([_he_tile(rng, 0.05) for _ in range(3)])
    crowded = np.stack([_he_tile(rng, 0.5) for _ in range(3)])
    assert list(classifier.predict(stroma).argmax(axis=1)) == [TISSUE] * 3
    assert list(classifier.predict(crowded).argmax(axis=1)) == [CELLULAR] * 3


def test_mostly_empty_tiles_and_black_debris_are_background(classifier: Classifier):
    rng = np.random.default_rng(1)
    edge = _he_tile(rng, 0.3)
    edge[:, 30:] = 245  # a sliver of tissue at the left edge of a glass tile
    black = np.zeros((224, 224, 3), np.uint8)  # pen, debris, or an unscanned area read as black
    assert list(classifier.predict(np.stack([edge, black])).argmax(axis=1)) == [BACKGROUND, BACKGROUND]


def test_features_report_tissue_fraction_and_hematoxylin():
    he = HeTissueClassifier()
    rng = np.random.default_rng(2)
    half = _he_tile(rng, 0.05)
    half[:, 112:] = 245
    features = he.features(np.stack([half, _he_tile(rng, 0.5)]))
    assert features[0, 0] == pytest.approx(0.5, abs=0.02)
    assert features[1, 0] == pytest.approx(1.0, abs=0.01)
    assert features[1, 1] > 3 * features[0, 1]  # crowded nuclei: far more hematoxylin per tissue pixel


def test_rejects_input_that_is_not_rgb_uint8_tiles(classifier: Classifier):
    with pytest.raises(ValueError, match="uint8"):
        classifier.predict(np.zeros((2, 224, 224, 3), np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="N×H×W×3"):
        classifier.predict(np.zeros((224, 224, 3), np.uint8))


def _mixed_shares_batch() -> NDArray[np.uint8]:
    rng = np.random.default_rng(3)
    shares = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
    return np.stack([_he_tile(rng, share) for share in shares * 10] + list(_tiles_from_model("glass", 4)))


def _assert_close_to_float32(got: NDArray[np.float32], expected: NDArray[np.float32]) -> None:
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=0.02)  # float16 matmul under autocast vs float32
    top_two = np.sort(expected, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 0.05  # where float32's answer is not a near tie, the label is the same
    assert clear.sum() >= len(expected) // 2
    assert list(got[clear].argmax(axis=1)) == list(expected[clear].argmax(axis=1))


def test_mixed_precision_keeps_the_answer_within_0_02_of_float32_on_cpu() -> None:
    # The GPU path's precision choices (autocast: float16 matmul, float32 log and sums) checked where
    # there is no GPU: CPU autocast uses the same op lists.
    tiles = _mixed_shares_batch()
    expected = HeTissueClassifier().predict(tiles)
    reduced = HeTissueClassifier(mixed_precision=True)
    got = reduced.predict(tiles)
    assert not np.array_equal(got, expected)  # float16 did run
    _assert_close_to_float32(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_go_through_pinned_memory_with_mixed_precision_and_match_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    on_gpu = get_classifier("he-tissue", "1.0.0")  # CUDA is picked when present
    assert isinstance(on_gpu, HeTissueClassifier)
    assert on_gpu.device.type == "cuda"
    pinned: list[bool] = []
    pin_memory = torch.Tensor.pin_memory

    def spy(tensor: torch.Tensor) -> torch.Tensor:
        result = pin_memory(tensor)
        pinned.append(result.is_pinned())
        return result

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    tiles = _mixed_shares_batch()
    expected = get_classifier("he-tissue", "1.0.0", device="cpu").predict(tiles)
    got = on_gpu.predict(tiles)
    again = on_gpu.predict(tiles)  # the pinned staging memory is reused; the answer must not change
    assert pinned == [True, True]  # one pinned host batch per predict, copied without blocking
    assert on_gpu.mixed_precision
    _assert_close_to_float32(got, expected)
    np.testing.assert_allclose(got, again, atol=1e-6)
