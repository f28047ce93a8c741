"""Quality of PSM's intermediate labels against instance ground truth the pipeline never trains on.

- pseudo mask (stage 3): pixel precision |M & G| / |M|, recall |M & G| / |G|, Dice, IoU (G = GT foreground);
- Voronoi labels (stage 5): nucleus-label precision (share of label-1 pixels inside GT nuclei), background-label
  precision (share of label-0 pixels outside them), labelled fraction; point precision/recall (a point is a hit
  when it falls in a GT nucleus not hit before; recall = hit nuclei / all nuclei).
Pooled over images (sums of pixel/point counts).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

__all__ = ["mask_counts", "voronoi_counts", "pooled_quality"]


def mask_counts(mask: np.ndarray, gt: np.ndarray) -> Dict[str, int]:
    """Pixel counts of a binary mask against an instance map: inter, mask, gt."""
    m, g = mask > 0, gt > 0
    return {"inter": int(np.count_nonzero(m & g)), "mask": int(m.sum()), "gt": int(g.sum())}


def voronoi_counts(vor: np.ndarray, gt: np.ndarray, points: Optional[np.ndarray] = None) -> Dict[str, int]:
    """Counts for Voronoi labels (0/1/255) and optional (N, 2) points against an instance map."""
    g = gt > 0
    out = {"fg_label": int((vor == 1).sum()), "fg_label_in_gt": int(((vor == 1) & g).sum()),
           "bg_label": int((vor == 0).sum()), "bg_label_out_gt": int(((vor == 0) & ~g).sum()),
           "pixels": int(vor.size)}
    if points is not None:
        pts = np.asarray(points, np.int64).reshape(-1, 2)
        ids = gt[pts[:, 0], pts[:, 1]] if len(pts) else np.zeros(0, gt.dtype)
        out.update(points=int(len(pts)), points_hit=int(np.unique(ids[ids > 0]).size),
                   nuclei=int(np.unique(gt[gt > 0]).size))
    return out


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0


def pooled_quality(counts: List[Dict[str, int]]) -> Dict[str, float]:
    """Precision/recall/Dice/IoU from summed :func:`mask_counts` or :func:`voronoi_counts` dicts."""
    if not counts:
        return {}
    s = {k: sum(c.get(k, 0) for c in counts) for k in counts[0]}
    if "inter" in s:
        return {"precision": _div(s["inter"], s["mask"]), "recall": _div(s["inter"], s["gt"]),
                "Dice": _div(2 * s["inter"], s["mask"] + s["gt"]),
                "IoU": _div(s["inter"], s["mask"] + s["gt"] - s["inter"]), "images": len(counts)}
    out = {"nucleus_label_precision": _div(s["fg_label_in_gt"], s["fg_label"]),
           "background_label_precision": _div(s["bg_label_out_gt"], s["bg_label"]),
           "labelled_fraction": _div(s["fg_label"] + s["bg_label"], s["pixels"]), "images": len(counts)}
    if "points" in s:
        out.update(point_precision=_div(s["points_hit"], s["points"]), point_recall=_div(s["points_hit"], s["nuclei"]),
                   points=s["points"], nuclei=s["nuclei"])
    return out
