"""PSM stage 6 output: nucleus instances from the segmentation network's foreground probability.

Default (the paper): connected components of ``prob > threshold`` with small objects and holes removed.
Option: marker watershed inside the foreground, seeded by the detected points (splits touching nuclei that one
component would merge), flooding either the negative blurred probability (flat where the network saturates) or
the negative distance to the background (the classic shape cue: touching round nuclei meet at a neck).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

from mmt_psm.nuclei.deps import skimage
from mmt_psm.nuclei.pseudo_masks import remove_small
from mmt_psm.nuclei.voronoi import detect_points

__all__ = ["instances_from_probability"]


def instances_from_probability(
    prob: np.ndarray, threshold: float = 0.5, min_size: int = 30, max_hole_size: int = 64,
    watershed: bool = False, points: Optional[np.ndarray] = None, sigma: float = 2.0, min_distance: int = 6,
    surface: str = "probability",
) -> np.ndarray:
    """HxW int32 instance map (0 = background, 1..N) of an HxW foreground probability.

    With ``watershed`` the markers are ``points`` ((N, 2) row/col) or, when None, the local maxima of the
    blurred probability (``detect_points``); a foreground component without a marker keeps its own label.
    ``surface``: what the watershed floods, ``"probability"`` (-blurred probability) or ``"distance"`` (-Euclidean
    distance to the background)."""
    if surface not in ("probability", "distance"):
        raise ValueError(f"watershed surface {surface!r}: expected 'probability' or 'distance'")
    measure, segmentation = skimage("measure"), skimage("segmentation")
    fg = remove_small(prob > threshold, min_size, max_hole_size)
    if not watershed:
        return measure.label(fg, connectivity=1).astype(np.int32)
    if points is None:
        points = detect_points(prob, sigma=sigma, min_distance=min_distance, threshold=threshold)
    markers = np.zeros(prob.shape, np.int32)
    inside = [p for p in np.asarray(points).reshape(-1, 2) if fg[p[0], p[1]]]
    for i, (r, c) in enumerate(inside, start=1):
        markers[r, c] = i
    comps = measure.label(fg, connectivity=1)
    unseeded = np.setdiff1d(np.unique(comps[fg]), np.unique(comps[markers > 0]))
    next_id = len(inside) + 1
    for comp in unseeded:  # one marker at the most interior pixel of each component without a point
        dist = ndimage.distance_transform_edt(comps == comp)
        r, c = np.unravel_index(np.argmax(dist), dist.shape)
        markers[r, c] = next_id
        next_id += 1
    height = ndimage.distance_transform_edt(fg) if surface == "distance" else ndimage.gaussian_filter(prob, sigma)
    labels = segmentation.watershed(-height, markers, mask=fg)
    if min_size > 0:  # watershed pieces below min_size go (label image: ids are kept apart)
        areas = np.bincount(labels.ravel())
        labels[areas[labels] < min_size] = 0
    return segmentation.relabel_sequential(labels)[0].astype(np.int32)
