"""Classifiers: the protocol the pipeline calls, and the registry of applications/versions.

A classifier declares the tile it wants (``tile_px`` pixels at ``mpp`` µm/px) and maps a batch of RGB
tiles to class probabilities. torch is imported only when a classifier is built, so the protocol and
the registry stay cheap to import (the tile-reading worker processes never need torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from slidebridge.errors import NotFoundError

if TYPE_CHECKING:
    import torch

RGB = tuple[int, int, int]


@runtime_checkable
class Classifier(Protocol):
    """What the pipeline needs from a classifier.

    ``predict`` takes ``N × tile_px × tile_px × 3`` uint8 RGB tiles (already at ``mpp`` µm/px) and
    returns ``N × len(class_names)`` float32 probabilities (rows sum to 1).
    """

    @property
    def application_id(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def tile_px(self) -> int: ...

    @property
    def mpp(self) -> float: ...

    @property
    def class_names(self) -> tuple[str, ...]: ...

    @property
    def class_colors(self) -> tuple[RGB, ...]: ...

    @property
    def background_class(self) -> str | None:
        """The class meaning "no tissue here" (not drawn as a region), if the classifier has one."""
        ...

    def predict(self, batch: NDArray[np.uint8]) -> NDArray[np.float32]: ...


def select_device(preferred: str | None = None) -> torch.device:
    """CUDA when present (or ``preferred`` if given, e.g. "cpu" to force it), else CPU."""
    import torch  # noqa: PLC0415 - torch only where a classifier is built

    if preferred is not None:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _he_tissue_1_0_0(device: str | None) -> Classifier:
    from batch_job.classifiers.he_tissue import HeTissueClassifier  # noqa: PLC0415 - imports torch

    return HeTissueClassifier(device=select_device(device))


# (application id, version) → factory. User models (TorchScript + manifest) register here too.
_REGISTRY: dict[tuple[str, str], Callable[[str | None], Classifier]] = {
    ("he-tissue", "1.0.0"): _he_tissue_1_0_0,
}


def available_classifiers() -> list[tuple[str, str]]:
    """(application id, version) of every registered classifier."""
    return sorted(_REGISTRY)


def get_classifier(application_id: str, version: str, *, device: str | None = None) -> Classifier:
    """Build the classifier for an application version; NotFoundError when there is none."""
    try:
        factory = _REGISTRY[(application_id, version)]
    except KeyError:
        known = ", ".join(f"{app}:{ver}" for app, ver in available_classifiers())
        raise NotFoundError(f"no classifier for application {application_id}:{version} (known: {known})") from None
    return factory(device)
