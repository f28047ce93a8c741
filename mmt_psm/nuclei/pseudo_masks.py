"""PSM stage 3: semantic-guided pseudo masks by k-means on the image + the colour-mapped self-activation map.

As in the authors' code: features = JET(activation) + BETA * image (both RGB in [0, 1]); k-means with K = 3
(scikit-learn); the foreground cluster is the one with the lowest colour-prior score, averaged over the cluster:

- ``prior="authors"``: (image R + image G) + (JET G + JET B): nuclei are dark in red and green (haematoxylin
  blue-purple) and highly activated (JET red: low green and blue). The JET term is not monotone (JET of 0 is
  dark blue, G + B = 0.5, lower than at 0.2-0.6): on a tile whose activation is low almost everywhere it picked
  the pink stroma (MoNuSeg train, TCGA-E2-A1B5: pseudo-mask Dice 0.04);
- ``prior="darkness"``: image R + image G only (nuclei are the darkest in red and green); the activation still
  shapes the clusters through the features. Measured on the 13 MoNuSeg training tiles (BENCHMARKS.md).
Then small objects and holes are removed (scikit-image).
The authors' ``remove_small_objects`` received a 0/1 integer map and so removed nothing; here it runs on the
boolean mask with ``MIN_OBJECT_SIZE``.
"""
from __future__ import annotations

import logging
import warnings
from typing import Tuple

import cv2
import numpy as np

from mmt_psm.nuclei.deps import skimage, sklearn_cluster

__all__ = ["jet_colour_map", "cluster_features", "foreground_cluster", "pseudo_mask", "remove_small"]

logger = logging.getLogger(__name__)


def remove_small(mask: np.ndarray, min_object_size: int, max_hole_size: int) -> np.ndarray:
    """``mask`` without objects smaller than ``min_object_size`` px and with holes smaller than ``max_hole_size``
    px filled (scikit-image; its >= 0.26 ``max_size`` spelling when available, else ``min_size``)."""
    mask = mask.astype(bool)
    morphology = skimage("morphology")
    if min_object_size > 0:
        try:
            mask = morphology.remove_small_objects(mask, max_size=min_object_size - 1)
        except TypeError:  # scikit-image < 0.26
            mask = morphology.remove_small_objects(mask, min_size=min_object_size)
    if max_hole_size > 0:
        try:
            mask = morphology.remove_small_holes(mask, max_size=max_hole_size - 1)
        except TypeError:
            mask = morphology.remove_small_holes(mask, area_threshold=max_hole_size)
    return mask


def jet_colour_map(activation: np.ndarray) -> np.ndarray:
    """HxWx3 float32 RGB in [0, 1]: OpenCV's JET colour map of an activation map in [0, 1]."""
    a = np.clip(activation, 0.0, 1.0)
    bgr = cv2.applyColorMap(np.uint8(np.round(255 * a)), cv2.COLORMAP_JET)
    return bgr[:, :, ::-1].astype(np.float32) / 255.0


PRIORS = ("authors", "darkness")


def cluster_features(
    image: np.ndarray, activation: np.ndarray, beta: float = 1.0, prior: str = "authors"
) -> Tuple[np.ndarray, np.ndarray]:
    """(HxWx3 k-means features JET + beta * image, HxW colour-prior score per pixel; lower = nucleus)."""
    if prior not in PRIORS:
        raise ValueError(f"PSM.PSEUDO_MASK.PRIOR must be one of {PRIORS}, got {prior!r}")
    img = image.astype(np.float32) / 255.0
    heat = jet_colour_map(activation)
    score = img[:, :, 0] + img[:, :, 1]
    if prior == "authors":
        score = score + heat[:, :, 1] + heat[:, :, 2]
    return heat + beta * img, score


def foreground_cluster(labels: np.ndarray, prior: np.ndarray, k: int) -> int:
    """The cluster with the lowest mean colour-prior score (empty clusters never win)."""
    scores = [float(prior[labels == c].mean()) if np.any(labels == c) else np.inf for c in range(k)]
    return int(np.argmin(scores))


def pseudo_mask(
    image: np.ndarray, activation: np.ndarray, k: int = 3, beta: float = 1.0, min_object_size: int = 30,
    max_hole_size: int = 64, sample: int = 100000, seed: int = 0, prior: str = "authors",
    min_contrast: float = 0.1,
) -> np.ndarray:
    """HxW uint8 pseudo mask (1 = nucleus) of an HxWx3 uint8 RGB image and its activation map in [0, 1].

    k-means is fitted on at most ``sample`` random pixels (all pixels are then assigned). An image with fewer
    than ``k`` distinct feature values, or whose foreground cluster is less than ``min_contrast`` darker (mean
    image R + G in [0, 2]) than its brightest cluster (a blank or background-only tile), gets an empty mask and a
    warning."""
    kmeans = sklearn_cluster().KMeans  # a missing scikit-learn fails here, whatever the image
    if image.shape[:2] != activation.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and activation map {activation.shape[:2]} differ in size")
    feats, score = cluster_features(image, activation, beta, prior)
    flat = feats.reshape(-1, 3)
    rng = np.random.default_rng(seed)
    fit = flat[rng.choice(flat.shape[0], sample, replace=False)] if flat.shape[0] > sample else flat
    if len(np.unique(np.round(fit, 3), axis=0)) < k:
        logger.warning("pseudo_mask: image has fewer than %d distinct colours: no foreground", k)
        return np.zeros(image.shape[:2], np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on near-blank tiles: the result is still usable
        km = kmeans(n_clusters=k, n_init=3, random_state=seed).fit(fit)
    labels = km.predict(flat).reshape(image.shape[:2])
    fg = foreground_cluster(labels, score, k)
    img = image.astype(np.float32) / 255.0
    dark = img[:, :, 0] + img[:, :, 1]
    means = [float(dark[labels == c].mean()) for c in range(k) if np.any(labels == c)]
    if max(means) - float(dark[labels == fg].mean()) < min_contrast:
        logger.warning("pseudo_mask: no cluster is darker than the rest by %.2f: no foreground", min_contrast)
        return np.zeros(image.shape[:2], np.uint8)
    mask = labels == fg
    return remove_small(mask, min_object_size, max_hole_size).astype(np.uint8)
