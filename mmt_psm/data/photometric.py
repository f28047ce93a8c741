"""Hue jitter and random erasing of *labeled* images as Detectron2 augmentations (image only, labels unchanged).

The authors' labeled ("source") transform is brightness 0.15, contrast 0.15, hue 0.05, then random erasing
with p = 0.7 (``data/transforms/build.py``); brightness and contrast are Detectron2's own ``RandomBrightness`` /
``RandomContrast`` (``INPUT.BRIGHTNESS`` / ``INPUT.CONTRAST``), these two add the rest (``INPUT.HUE``,
``INPUT.ERASE_PROB``). Both reuse the unlabeled views' functions (:mod:`mmt_psm.modeling.views`), so a labeled
image and an unlabeled view are perturbed the same way. Erased pixels keep their labels, as in the authors'
code (erasing is an occlusion the model must see through). Randomness comes from numpy's global RNG, which
Detectron2's loader seeds per worker.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import NoOpTransform, Transform

from mmt_psm.modeling.views import color_jitter, random_erase

__all__ = ["RandomHue", "RandomErasing", "ImageOnlyTransform"]


class ImageOnlyTransform(Transform):
    """Applies a precomputed image (same shape) and leaves coordinates and segmentations unchanged."""

    def __init__(self, image: np.ndarray):
        super().__init__()
        self.image = image

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.shape != self.image.shape:
            raise ValueError(f"ImageOnlyTransform made for shape {self.image.shape}, applied to {img.shape}")
        return self.image

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def inverse(self) -> Transform:
        return NoOpTransform()


def _rng() -> np.random.Generator:
    """A Generator drawn from numpy's global RNG (which Detectron2 seeds per data-loader worker)."""
    return np.random.default_rng(np.random.randint(0, 2**31 - 1))


class RandomHue(T.Augmentation):
    """Rotate the HSV hue by ``U(-hue, hue)`` turns (torchvision ``adjust_hue`` semantics, uint8 images; a no-op
    on grayscale-looking images)."""

    def __init__(self, hue: float, image_format: str = "BGR"):
        super().__init__()
        if not 0 < hue <= 0.5:
            raise ValueError(f"hue must be in (0, 0.5], got {hue}")
        self.hue, self.image_format = float(hue), image_format

    def get_transform(self, image: np.ndarray) -> Transform:
        out = color_jitter(image, _rng(), brightness=0.0, contrast=0.0, hue=self.hue, image_format=self.image_format)
        return ImageOnlyTransform(out)


class RandomErasing(T.Augmentation):
    """Zhong et al.'s random erasing as the authors run it: ``randint(0, max_patches)`` attempts, each kept with
    probability ``prob``, patches of ``area`` fraction and ``aspect`` ratio filled with uniform noise."""

    def __init__(
        self,
        prob: float,
        max_patches: int = 10,
        area: Tuple[float, float] = (0.001, 0.004),
        aspect: Tuple[float, float] = (0.2, 5.0),
    ):
        super().__init__()
        if not 0 < prob <= 1:
            raise ValueError(f"erase probability must be in (0, 1], got {prob}")
        self.prob, self.max_patches = float(prob), int(max_patches)
        self.area, self.aspect = tuple(area), tuple(aspect)

    def get_transform(self, image: np.ndarray) -> Transform:
        if image.dtype != np.uint8:
            raise TypeError(f"RandomErasing expects a uint8 image, got {image.dtype}")
        return ImageOnlyTransform(random_erase(image, _rng(), self.prob, self.max_patches, self.area, self.aspect))
