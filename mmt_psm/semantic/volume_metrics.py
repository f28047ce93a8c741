"""Per-volume 3D Dice and HD95 the way SSL4MIS/WSL4MIS compute them (``medpy.metric.binary.dc`` / ``hd95``).

Empty cases (medpy raises on an empty mask, SSL4MIS's ``val_2D`` returns (0, 0) for an empty prediction, which
flatters HD95): here
- prediction and ground truth both empty: Dice 1, HD95 0 (nothing to find, nothing found);
- exactly one of them empty: Dice 0, HD95 = the volume's diagonal (in the same units), the worst distance
  possible, so a missed structure is never scored as a perfect boundary.
HD95 is in voxels, or in millimetres when a ``spacing`` (per axis, slice axis first) is given.

``largest_components``: the optional post-processing many cardiac pipelines apply before scoring (each of RV, Myo
and LV is one connected object; stray islands far from the heart dominate HD95).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from mmt_psm.core.optional import optional_import

__all__ = ["dice_hd95", "volume_scores", "largest_components", "require_medpy"]


def require_medpy():
    """``medpy.metric.binary``, or an ImportError naming medpy and the task (medpy is imported only here: the other
    tasks train without it)."""
    return optional_import("medpy.metric.binary", "medpy", "the ACDC volume metrics (semantic task)")


def _diagonal(shape: Sequence[int], spacing: Optional[Sequence[float]]) -> float:
    sp = [1.0] * len(shape) if spacing is None else list(spacing)
    return math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, sp)))


def dice_hd95(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None) -> Tuple[float, float]:
    """(Dice, HD95) of two binary volumes, with the empty-case convention of this module."""
    medpy_binary = require_medpy()
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    p_any, g_any = bool(pred.any()), bool(gt.any())
    if not p_any and not g_any:
        return 1.0, 0.0
    if p_any != g_any:
        return 0.0, _diagonal(pred.shape, spacing)
    return float(medpy_binary.dc(pred, gt)), float(medpy_binary.hd95(pred, gt, voxelspacing=spacing))


def volume_scores(
    pred: np.ndarray, gt: np.ndarray, classes: Dict[int, str], spacing: Optional[Sequence[float]] = None
) -> Dict[str, float]:
    """``{"Dice-<name>": ..., "HD95-<name>": ...}`` for each ``label value -> name`` of a label volume."""
    out = {}
    for value, name in classes.items():
        d, h = dice_hd95(pred == value, gt == value, spacing)
        out[f"Dice-{name}"], out[f"HD95-{name}"] = d, h
    return out


def largest_components(pred: np.ndarray, values: Sequence[int], background: int = 0) -> np.ndarray:
    """A copy of the label volume ``pred`` in which each label of ``values`` keeps only its largest connected
    component (face connectivity in 3D, scipy.ndimage.label); the voxels of its other components become
    ``background``. Ties keep the component scipy numbers first."""
    out = np.array(pred, copy=True)
    for value in values:
        comps, n = ndimage.label(pred == value)
        if n > 1:
            sizes = np.bincount(comps.ravel())[1:]
            out[(comps > 0) & (comps != int(np.argmax(sizes)) + 1)] = background
    return out
