"""Default application ``he-tissue`` 1.0.0: background | tissue | cellular from H&E colour alone.

No weights. Per tile of 224 × 224 px at 1.0 µm/px (224 µm of slide; a nucleus is then 5-10 px,
enough to measure its stain, and the tile matches the input size of common CNNs, so a user model can
reuse the same grid):

1. optical density per pixel, OD = -ln((I + 1) / 256) (Beer-Lambert; +1 keeps black pixels finite);
2. tissue pixels: total OD above that of clean glass and below that of black debris or pen;
3. Ruifrok-Johnston colour deconvolution of the OD with the H&E-DAB matrix that scikit-image's
   ``rgb2hed`` uses (``skimage.color.hed_from_rgb``), which gives the hematoxylin concentration;
4. features: tissue fraction of the tile, and the mean hematoxylin concentration over its tissue
   pixels (nuclei are hematoxylin-dense, so this is high where nuclei crowd together);
5. calibrated scores, as two nested logistic steps: P(tissue) rises through a tissue fraction of
   ~25 %, and P(cellular | tissue) through a mean hematoxylin of ~0.2 (stroma with scattered nuclei
   measures 0.05-0.15, densely cellular tissue 0.3-1.0, on real H&E as on the synthetic slides);
   the class probabilities are the softmax of the resulting log-probabilities
   [glass, tissue ∧ ¬cellular, tissue ∧ cellular].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from skimage.color import hed_from_rgb

from batch_job.classifiers import RGB

# Total OD (sum over R, G, B) bounds of a tissue pixel: glass scans at RGB ≈ 240-250 (≤ 0.2), the
# palest eosin at ≥ 0.35; black debris and pen marks at RGB < 30 (≥ 6).
_TISSUE_OD_MIN = 0.3
_TISSUE_OD_MAX = 6.0
# Calibration of the scores (see the module docstring): midpoints and slopes of the logistic steps.
_TISSUE_FRACTION_MID = 0.25
_TISSUE_SLOPE = 15.0
_HEMATOXYLIN_MID = 0.2
_HEMATOXYLIN_SLOPE = 20.0


class HeTissueClassifier:
    """``he-tissue`` 1.0.0 (see the module docstring). Satisfies ``batch_job.classifiers.Classifier``."""

    application_id = "he-tissue"
    version = "1.0.0"
    tile_px = 224
    mpp = 1.0
    class_names: tuple[str, ...] = ("background", "tissue", "cellular")
    # Overlay colours chosen to stand out on pink/purple H&E: grey, green, red.
    class_colors: tuple[RGB, ...] = ((190, 190, 190), (46, 160, 67), (214, 39, 40))
    background_class: str | None = "background"

    def __init__(self, device: torch.device | None = None, *, mixed_precision: bool | None = None) -> None:
        self.device = device or torch.device("cpu")
        # float16 matmuls under autocast: on by default on CUDA (tensor cores), off on CPU where it
        # only costs conversions; forcing it on a CPU checks the same precision choices without a GPU.
        self.mixed_precision = self.device.type == "cuda" if mixed_precision is None else mixed_precision
        # Row vector convention: concentrations = OD @ hed_from_rgb (columns: H, E, DAB).
        self._hed_from_rgb = torch.as_tensor(hed_from_rgb, dtype=torch.float32, device=self.device)

    def features(self, batch: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Per tile: (tissue fraction, mean hematoxylin concentration of its tissue pixels)."""
        with torch.inference_mode():
            return self._features(self._to_device(batch)).float().cpu().numpy()

    def predict(self, batch: NDArray[np.uint8]) -> NDArray[np.float32]:
        if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
            raise ValueError(f"expected N×H×W×3 uint8 tiles, got {batch.dtype} {batch.shape}")
        with torch.inference_mode():
            feats = self._features(self._to_device(batch)).float()
            tissue_fraction, hematoxylin = feats[:, 0], feats[:, 1]
            # Two nested decisions, each a logistic step: is the tile tissue at all, and if so, is
            # it cellular. A tile with little tissue is background however dark that tissue is.
            tissue_score = _TISSUE_SLOPE * (tissue_fraction - _TISSUE_FRACTION_MID)
            cellular_score = _HEMATOXYLIN_SLOPE * (hematoxylin - _HEMATOXYLIN_MID)
            log_tissue, log_glass = F.logsigmoid(tissue_score), F.logsigmoid(-tissue_score)
            logits = torch.stack(
                [
                    log_glass,
                    log_tissue + F.logsigmoid(-cellular_score),
                    log_tissue + F.logsigmoid(cellular_score),
                ],
                dim=1,
            )
            probabilities: NDArray[np.float32] = torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32)
        return probabilities

    def _to_device(self, batch: NDArray[np.uint8]) -> torch.Tensor:
        tiles = torch.from_numpy(np.ascontiguousarray(batch))
        if self.device.type == "cuda":
            # From pinned memory the copy is a DMA at full PCIe speed and does not block the host;
            # the kernels queue behind it on the same stream.
            return tiles.pin_memory().to(self.device, non_blocking=True)
        return tiles.to(self.device)

    def _features(self, tiles: torch.Tensor) -> torch.Tensor:
        # Autocast runs the colour deconvolution's matmul in float16 and keeps log and the reductions
        # in float32 (the same op lists on CUDA and CPU).
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.mixed_precision):
            density = -torch.log((tiles.float() + 1.0) / 256.0)  # N×H×W×3, natural-log OD
            total = density.sum(dim=-1)
            tissue = ((total > _TISSUE_OD_MIN) & (total < _TISSUE_OD_MAX)).float()
            hematoxylin = (density @ self._hed_from_rgb)[..., 0]
            tissue_px = tissue.sum(dim=(1, 2))
            pixels = float(tiles.shape[1] * tiles.shape[2])
            tissue_fraction = tissue_px / pixels
            mean_h = (hematoxylin.float() * tissue).sum(dim=(1, 2)) / tissue_px.clamp(min=1.0)
            return torch.stack([tissue_fraction, mean_h], dim=1)
