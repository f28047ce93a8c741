"""PSM stage 3, option ``PSM.PSEUDO_MASK.METHOD "haematoxylin"``: pseudo masks from the haematoxylin stain.

Not in the paper. Colour deconvolution (Ruifrok & Johnston; scikit-image's ``rgb2hed``) separates the
haematoxylin stain, which binds to nuclei, from eosin. The haematoxylin density is min-max scaled between its
1st and 99th percentiles, blurred with a Gaussian of ``sigma`` px, and ``act_weight`` times the self-activation
map (stage 2) is added. Otsu's threshold (scikit-image) then splits the result, and small objects and holes are
removed as in the k-means method. On the 13 MoNuSeg training tiles (never trained on) this raised pseudo-mask
Dice from 0.68 (k-means, the config's darkness prior) to 0.75 (BENCHMARKS.md, PSM section).
"""
from __future__ import annotations

import logging

import cv2
import numpy as np

from mmt_psm.nuclei.deps import skimage
from mmt_psm.nuclei.pseudo_masks import remove_small

__all__ = ["haematoxylin_density", "haematoxylin_mask"]

logger = logging.getLogger(__name__)


def haematoxylin_density(image: np.ndarray) -> np.ndarray:
    """HxW float32 haematoxylin optical density of an HxWx3 uint8 RGB H&E image (``rgb2hed`` channel 0)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    return skimage("color").rgb2hed(image)[:, :, 0].astype(np.float32)


def haematoxylin_mask(
    image: np.ndarray, activation: np.ndarray, sigma: float = 2.0, act_weight: float = 0.15,
    min_object_size: int = 30, max_hole_size: int = 64, min_range: float = 0.03,
) -> np.ndarray:
    """HxW uint8 pseudo mask (1 = nucleus): Otsu's threshold of the scaled, blurred haematoxylin density plus
    ``act_weight`` x the activation map in [0, 1].

    A tile whose haematoxylin density spans less than ``min_range`` between its 1st and 99th percentile (a blank
    or stain-free tile: no nucleus to find) gets an empty mask and a warning."""
    if image.shape[:2] != activation.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and activation map {activation.shape[:2]} differ in size")
    if sigma < 0 or act_weight < 0:
        raise ValueError(f"sigma ({sigma}) and act_weight ({act_weight}) must be >= 0")
    h = haematoxylin_density(image)
    lo, hi = np.percentile(h, [1, 99])
    if hi - lo < min_range:
        logger.warning("haematoxylin_mask: stain range %.4f < %.4f: no foreground", hi - lo, min_range)
        return np.zeros(image.shape[:2], np.uint8)
    z = np.clip((h - lo) / (hi - lo), 0.0, 1.0)
    if sigma > 0:
        z = cv2.GaussianBlur(z, (0, 0), sigma)
    z = z + act_weight * np.clip(activation, 0.0, 1.0).astype(np.float32)
    mask = z > skimage("filters").threshold_otsu(z)
    return remove_small(mask, min_object_size, max_hole_size).astype(np.uint8)
