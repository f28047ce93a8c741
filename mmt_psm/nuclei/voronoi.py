"""PSM stage 5: nucleus points from the detection network's foreground probability, and Voronoi labels.

Points = local maxima of the Gaussian-blurred probability above a threshold (scikit-image ``peak_local_max``).
Voronoi labels: the Voronoi partition of the points (nearest point per pixel, ``scipy.spatial.cKDTree``); its
cell borders (``skimage.segmentation.find_boundaries``) -> background (0), points dilated by a disk -> nucleus
(1), everything else ignore (255). Dilated points win over edges, as in the authors' code.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from mmt_psm.nuclei.deps import skimage

__all__ = ["detect_points", "voronoi_regions", "voronoi_labels", "IGNORE"]

IGNORE = 255


def detect_points(prob: np.ndarray, sigma: float = 2.0, min_distance: int = 6, threshold: float = 0.5) -> np.ndarray:
    """(N, 2) int (row, col) local maxima of ``gaussian(prob, sigma)`` that are >= ``threshold``."""
    blurred = ndimage.gaussian_filter(prob.astype(np.float32), sigma) if sigma > 0 else prob.astype(np.float32)
    pts = skimage("feature").peak_local_max(blurred, min_distance=max(int(min_distance), 1), threshold_abs=threshold,
                                 exclude_border=False)
    return pts.astype(np.int64).reshape(-1, 2)


def voronoi_regions(points: np.ndarray, shape) -> np.ndarray:
    """HxW int32: 1 + index of the nearest point for every pixel (0 everywhere when there are no points)."""
    h, w = int(shape[0]), int(shape[1])
    if len(points) == 0:
        return np.zeros((h, w), np.int32)
    yy, xx = np.mgrid[:h, :w]
    _, idx = cKDTree(np.asarray(points, np.float64)).query(np.stack([yy.ravel(), xx.ravel()], 1))
    return (idx.reshape(h, w) + 1).astype(np.int32)


def voronoi_labels(points: np.ndarray, shape, point_radius: int = 2) -> np.ndarray:
    """HxW uint8: 0 on Voronoi edges, 1 on points dilated by ``point_radius``, ``IGNORE`` elsewhere."""
    h, w = int(shape[0]), int(shape[1])
    out = np.full((h, w), IGNORE, np.uint8)
    if len(points) == 0:
        return out
    regions = voronoi_regions(points, (h, w))
    out[skimage("segmentation").find_boundaries(regions, mode="inner")] = 0
    dots = np.zeros((h, w), bool)
    pts = np.asarray(points, np.int64)
    dots[pts[:, 0], pts[:, 1]] = True
    if point_radius > 0:
        dots = ndimage.binary_dilation(dots, structure=skimage("morphology").disk(point_radius))
    out[dots] = 1
    return out
