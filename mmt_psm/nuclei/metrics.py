"""Nucleus instance metrics on label maps (MoNuSeg protocol): AJI (per-image mean and pooled), object F1 at
IoU 0.5, pixel Dice / IoU, COCO mask AP, and the PSM paper's protocol (centre crop, connected-component GT).

Why label maps: MoNuSeg images hold ~500-800 nuclei at 1000 x 1000, and the (N, H, W) mask stacks of
:mod:`mmt_psm.core.object_metrics` would need ~0.5 GB per image. Intersections come from one ``bincount``
over (gt id, pred id) pairs; AJI follows ``cell_metrics.aji_counts``'s convention exactly (tested equal), and
object matching reuses its ``match_objects`` / ``f1_from_counts``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mmt_psm.core.object_metrics import f1_from_counts, match_objects
from mmt_psm.nuclei.deps import skimage

__all__ = ["label_map_counts", "aji_from_counts", "image_scores", "summarize_scores", "coco_mask_ap",
           "centre_crop", "paper_protocol_scores"]


def label_map_counts(gt: np.ndarray, pred: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inter (G, P), gt areas (G,), pred areas (P,)) of two instance maps (ids relabelled 1..G / 1..P)."""
    if gt.shape != pred.shape:
        raise ValueError(f"GT {gt.shape} and prediction {pred.shape} label maps differ in size")
    segmentation = skimage("segmentation")
    g = segmentation.relabel_sequential(gt.astype(np.int64))[0]
    p = segmentation.relabel_sequential(pred.astype(np.int64))[0]
    ng, npred = int(g.max()), int(p.max())
    both = (g > 0) & (p > 0)
    code = (g[both] - 1) * max(npred, 1) + (p[both] - 1)
    inter = np.bincount(code, minlength=ng * npred).reshape(ng, npred) if ng and npred else np.zeros((ng, npred))
    gt_area = np.bincount(g.ravel(), minlength=ng + 1)[1:]
    pred_area = np.bincount(p.ravel(), minlength=npred + 1)[1:]
    return inter.astype(np.int64), gt_area.astype(np.int64), pred_area.astype(np.int64)


def _iou(inter: np.ndarray, gt_area: np.ndarray, pred_area: np.ndarray) -> np.ndarray:
    union = gt_area[:, None] + pred_area[None, :] - inter
    return np.divide(inter, union, out=np.zeros(inter.shape, np.float64), where=union > 0)


def aji_from_counts(inter: np.ndarray, gt_area: np.ndarray, pred_area: np.ndarray) -> Tuple[int, int]:
    """AJI numerator C and denominator U (``cell_metrics.aji_counts``'s convention: best-IoU pairing per GT,
    unpaired predictions added to U)."""
    if gt_area.size == 0:
        return 0, int(pred_area.sum())
    if pred_area.size == 0:
        return 0, int(gt_area.sum())
    iou = _iou(inter, gt_area, pred_area)
    rows = np.arange(gt_area.size)
    best = iou.argmax(axis=1)
    paired = iou[rows, best] > 0
    bi = inter[rows, best]
    c = int(bi[paired].sum())
    u = int((gt_area + pred_area[best] - bi)[paired].sum()) + int(gt_area[~paired].sum())
    used = np.zeros(pred_area.size, bool)
    used[best[paired]] = True
    return c, u + int(pred_area[~used].sum())


def image_scores(gt: np.ndarray, pred: np.ndarray, iou_thresh: float = 0.5) -> Dict[str, float]:
    """Per-image counts and scores: aji_c, aji_u, AJI, tp/fp/fn, F1, Dice, IoU (empty cases: cell_metrics')."""
    inter, ga, pa = label_map_counts(gt, pred)
    c, u = aji_from_counts(inter, ga, pa)
    tp = int(match_objects(_iou(inter, ga, pa), iou_thresh)[0].size) if ga.size and pa.size else 0
    f1 = f1_from_counts(tp, pa.size - tp, ga.size - tp)
    a, b = gt > 0, pred > 0
    i, sa, sb = int(np.count_nonzero(a & b)), int(a.sum()), int(b.sum())
    empty = sa + sb == 0
    return {"aji_c": c, "aji_u": u, "AJI": 1.0 if u == 0 else c / u, "tp": tp, "fp": f1.fp, "fn": f1.fn,
            "F1": f1.f1, "precision": f1.precision, "recall": f1.recall,
            "Dice": 1.0 if empty else 2 * i / (sa + sb), "IoU": 1.0 if empty else i / (sa + sb - i),
            "num_gt": int(ga.size), "num_pred": int(pa.size)}


def summarize_scores(per_image: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """AJI (mean of per-image AJI), AJI_pooled (sum C / sum U), F1/Dice/IoU (per-image means), F1_pooled."""
    if not per_image:
        return {}
    mean = {k: float(np.mean([s[k] for s in per_image])) for k in ("AJI", "F1", "Dice", "IoU", "precision",
                                                                   "recall")}
    su = sum(s["aji_u"] for s in per_image)
    mean["AJI_pooled"] = sum(s["aji_c"] for s in per_image) / su if su else 1.0
    tp, fp, fn = (sum(s[k] for s in per_image) for k in ("tp", "fp", "fn"))
    mean["F1_pooled"] = f1_from_counts(tp, fp, fn).f1
    mean["num_images"] = len(per_image)
    return mean


def _rles(lab: np.ndarray) -> List[dict]:
    ids = np.unique(lab[lab > 0])
    return [mask_util.encode(np.asfortranarray((lab == v).astype(np.uint8))) for v in ids]


def coco_mask_ap(gt_maps: Sequence[np.ndarray], pred_maps: Sequence[np.ndarray],
                 pred_scores: Sequence[Sequence[float]], max_dets: int = 2000) -> Dict[str, float]:
    """COCO mask AP / AP50 / AP75 (pycocotools, up to ``max_dets`` detections per image; MoNuSeg images hold
    hundreds of nuclei, so COCO's default 100 would cap recall). ``pred_scores[i][j]`` scores id j+1 of map i
    (ids of each prediction map must be 1..N)."""
    images, anns, dets = [], [], []
    for i, (g, p, sc) in enumerate(zip(gt_maps, pred_maps, pred_scores), start=1):
        images.append({"id": i, "height": int(g.shape[0]), "width": int(g.shape[1])})
        for r in _rles(g):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "iscrowd": 0, "segmentation": r,
                         "area": float(mask_util.area(r)), "bbox": list(mask_util.toBbox(r))})
        for r, s in zip(_rles(p), sc):
            dets.append({"image_id": i, "category_id": 1, "segmentation": r, "score": float(s)})
    if not anns or not dets:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nucleus"}]}
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets), "segm")
    ev.params.maxDets = [1, 100, max_dets]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return {"AP": 100 * ev.stats[0], "AP50": 100 * ev.stats[1], "AP75": 100 * ev.stats[2]}


def centre_crop(a: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` window (the authors' ``[244:756, 244:756]`` on 1000 x 1000)."""
    h, w = a.shape[:2]
    y, x = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return a[y: y + size, x: x + size]


def paper_protocol_scores(gt: np.ndarray, pred: np.ndarray, size: int = 512) -> Dict[str, float]:
    """:func:`image_scores` on the centre crop; GT instances = connected components of the GT foreground
    (the authors' binary GT), predicted instances as given."""
    g = skimage("measure").label(centre_crop(gt, size) > 0, connectivity=1)
    return image_scores(g, centre_crop(pred, size))
