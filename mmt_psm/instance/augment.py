"""Photometric perturbations of MMT-PSM: colour jitter and random erasing, as functions (unlabeled views) and as
Detectron2 augmentations of *labeled* images (image only, labels unchanged).

They follow the authors' transforms (``data/transforms``): brightness, contrast, hue factors drawn uniformly
(PIL/torchvision semantics), then random erasing: ``randint(0, 10)`` patch attempts, each applied with
probability 0.9, area 0.1-0.4 % of the image, aspect 0.2-5, filled with uniform noise. The authors' labeled
("source") transform is brightness 0.15, contrast 0.15, hue 0.05, then random erasing with p = 0.7
(``data/transforms/build.py``); brightness and contrast are Detectron2's own ``RandomBrightness`` /
``RandomContrast`` (``INPUT.BRIGHTNESS`` / ``INPUT.CONTRAST``), ``RandomHue`` / ``RandomErasing`` add the rest
(``INPUT.HUE``, ``INPUT.ERASE_PROB``), with the same functions, so a labeled image and an unlabeled view are
perturbed the same way. Erased pixels keep their labels, as in the authors' code (erasing is an occlusion the
model must see through). The augmentations draw from numpy's global RNG, which Detectron2's loader seeds per
worker.
"""
from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import NoOpTransform, Transform

__all__ = ["color_jitter", "sample_erase_boxes", "random_erase", "RandomHue", "RandomErasing", "ImageOnlyTransform"]

_GRAY_WEIGHTS = {"RGB": (0.299, 0.587, 0.114), "BGR": (0.114, 0.587, 0.299)}


def _is_grayscale(img: np.ndarray) -> bool:
    """True for 2-D / 1-channel images and for colour images whose channels are all equal."""
    if img.ndim == 2 or img.shape[2] == 1:
        return True
    return bool((img[..., 1:] == img[..., :1]).all())


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def color_jitter(
    img: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.15,
    contrast: float = 0.15,
    hue: float = 0.05,
    image_format: str = "BGR",
) -> np.ndarray:
    """Brightness, contrast, then hue jitter of a uint8 ``HxWxC`` (or ``HxW``) image; returns a new array.

    Factors are uniform in ``[1-b, 1+b]``, ``[1-c, 1+c]`` and ``[-h, h]`` (torchvision ``adjust_*``):
    brightness scales, contrast blends with the mean gray level, hue rotates the HSV hue by ``h`` turns. Hue
    is skipped on grayscale-looking images (it would be a no-op). The factors are drawn whether or not they
    are used, so the random stream does not depend on the image content. ``image_format`` (Detectron2
    ``INPUT.FORMAT``) sets the gray weights and the HSV conversion.
    """
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    b = rng.uniform(1 - brightness, 1 + brightness) if brightness > 0 else 1.0
    c = rng.uniform(1 - contrast, 1 + contrast) if contrast > 0 else 1.0
    h = rng.uniform(-hue, hue) if hue > 0 else 0.0
    out = img
    if b != 1.0:
        out = _to_uint8(out.astype(np.float32) * b)
    if c != 1.0:
        f = out.astype(np.float32)
        if f.ndim == 3 and f.shape[2] == 3:
            gray = f @ np.asarray(_GRAY_WEIGHTS.get(image_format.upper(), _GRAY_WEIGHTS["RGB"]), np.float32)
        else:
            gray = f
        out = _to_uint8(c * f + (1.0 - c) * np.rint(gray.mean()))
    if h != 0.0 and out.ndim == 3 and out.shape[2] == 3 and not _is_grayscale(out):
        rgb = image_format.upper() != "BGR"
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV_FULL if rgb else cv2.COLOR_BGR2HSV_FULL)
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(h * 255))) % 256
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL if rgb else cv2.COLOR_HSV2BGR_FULL)
    return out if out is not img else img.copy()


def sample_erase_boxes(
    height: int,
    width: int,
    rng: np.random.Generator,
    prob: float = 0.9,
    max_patches: int = 10,
    area: Tuple[float, float] = (0.001, 0.004),
    aspect: Tuple[float, float] = (0.2, 5.0),
) -> np.ndarray:
    """Erase patches ``[n, 4]`` as (top, left, h, w), all inside the image.

    ``randint(0, max_patches)`` attempts, each kept with probability ``prob``; a patch has area
    ``a * H * W`` with ``a ~ U(area)`` and aspect ``h / w ~ U(aspect)``, sides truncated to ints (so its area
    is at most ``area[1] * H * W``, clamped to >= 1 pixel and to the image). The top-left corner is uniform
    over the positions where the patch fits (the authors resample until it fits; same result up to that
    conditioning).
    """
    n = int(rng.integers(0, max_patches + 1))
    keep = rng.random(n) < prob
    s = rng.uniform(area[0], area[1], n) * height * width
    r = rng.uniform(aspect[0], aspect[1], n)
    pw = np.clip(np.sqrt(s / r).astype(np.int64), 1, width)
    ph = np.clip(np.sqrt(s * r).astype(np.int64), 1, height)
    left = np.floor(rng.random(n) * (width - pw + 1)).astype(np.int64)
    top = np.floor(rng.random(n) * (height - ph + 1)).astype(np.int64)
    return np.stack([top, left, ph, pw], axis=1)[keep]


def random_erase(
    img: np.ndarray,
    rng: np.random.Generator,
    prob: float = 0.9,
    max_patches: int = 10,
    area: Tuple[float, float] = (0.001, 0.004),
    aspect: Tuple[float, float] = (0.2, 5.0),
) -> np.ndarray:
    """Random erasing (Zhong et al.) with uniform-noise fill; returns a new uint8 array of the same shape."""
    out = img.copy()
    boxes = sample_erase_boxes(img.shape[0], img.shape[1], rng, prob, max_patches, area, aspect)
    for top, left, ph, pw in boxes:  # at most max_patches small patches
        noise = rng.integers(0, 256, size=(ph, pw, *img.shape[2:]), dtype=np.uint8)
        out[top : top + ph, left : left + pw] = noise
    return out


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
