"""``PseudoLabelMonitorHook``: the teacher's pseudo-label quality, measured while training, on unlabeled images
whose ground truth is held back (never trained on).

Unlabeled images sometimes do have labels that training must not use (e.g. the ISBI 2015 train frames outside a
2-frame split). ``DATASETS.UNLABELED_GT`` names labeled data sets holding them; every ``SEMI.PSEUDO_MONITOR_PERIOD``
iterations the hook compares the step's pseudo-labels (the teacher's detections on view 0, as the model records
them for ``PseudoLabelVisHook``) with that ground truth mapped into the same view frame, and logs per class

    pseudo_quality/<class>/precision, /recall        at mask IoU > 0.5 (one-to-one matching), all pseudo-labels
    pseudo_quality/<class>/matched_iou                mean mask IoU of the matched pairs
    pseudo_quality/<class>/{precision,recall,matched_iou}@<t>   the same for pseudo-labels with score >= t

as EventStorage scalars (console, metrics.json, TensorBoard). It only reads what the model recorded: losses and
gradients are the same with and without it (tested). Images without held-back ground truth are skipped.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.layers import paste_masks_in_image

from mmt_psm.core.object_metrics import iou_matrix, match_objects
from mmt_psm.core.registry import TRAINER_HOOKS
from mmt_psm.instance.vis_hook import PseudoLabelRecordingHook, PseudoLabelVisHook

__all__ = ["PseudoLabelMonitorHook", "match_counts", "gt_masks_in_view", "build_pseudo_label_hooks"]

logger = logging.getLogger(__name__)


def match_counts(gt: np.ndarray, pred: np.ndarray, iou_thresh: float = 0.5) -> Dict[str, float]:
    """``tp``, ``num_pred``, ``num_gt`` and ``iou_sum`` (of matched pairs) of (N, H, W) bool mask stacks."""
    out = {"tp": 0.0, "num_pred": float(len(pred)), "num_gt": float(len(gt)), "iou_sum": 0.0}
    if len(gt) and len(pred):
        iou = iou_matrix(gt, pred)
        gi, pi = match_objects(iou, iou_thresh)
        out["tp"], out["iou_sum"] = float(gi.size), float(iou[gi, pi].sum())
    return out


def gt_masks_in_view(record: Dict, unlabeled: Dict) -> tuple:
    """(masks (N, H, W) bool, classes (N,)) of a ground-truth record mapped into teacher view 0 of ``unlabeled``:
    the mapper's crop/resize (``source_transform``, Detectron2 transforms), the shared base flip
    (``base_transform``), then view 0's own transform. Objects with no pixel left in the view (cropped away) are
    dropped: they are not in the image the teacher saw, so they must not count against its recall."""
    h, w = record["height"], record["width"]
    inst = utils.annotations_to_instances(record.get("annotations", []), (h, w), mask_format="bitmask")
    masks = inst.gt_masks.tensor.numpy().astype(np.uint8) if len(inst) else np.zeros((0, h, w), np.uint8)
    source = unlabeled.get("source_transform")
    if source is not None and len(masks):
        masks = np.stack([source.apply_segmentation(m) for m in masks])
    view_t = unlabeled["teacher_transforms"][0]
    m = torch.as_tensor(masks.astype(bool))
    if len(m):
        for t in (unlabeled.get("base_transform"), view_t):
            m = m if t is None else t.apply_masks(m)
    else:
        m = torch.zeros((0, *view_t.resized), dtype=torch.bool)
    masks, classes = m.numpy().astype(bool), inst.gt_classes.numpy()
    inside = masks.reshape(len(masks), -1).any(axis=1)  # objects the crop left out are not in this view
    return masks[inside], classes[inside]


def _summ(counts: Dict[str, float]) -> Dict[str, float]:
    tp, npred, ngt = counts["tp"], counts["num_pred"], counts["num_gt"]
    return {"precision": tp / npred if npred else 1.0, "recall": tp / ngt if ngt else 1.0,
            "matched_iou": counts["iou_sum"] / tp if tp else 0.0}


class PseudoLabelMonitorHook(PseudoLabelRecordingHook):
    """Logs pseudo-label precision / recall / matched IoU per class against held-back ground truth."""

    def __init__(self, period: int, gt_dataset_names: Sequence[str], score_thresh: float = 0.5,
                 mask_threshold: float = 0.5, vis_period: int = 0, class_names: Optional[List[str]] = None):
        self.period, self.names = int(period), list(gt_dataset_names)
        self.score_thresh, self.mask_threshold, self.vis_period = float(score_thresh), float(mask_threshold), vis_period
        self.class_names = class_names
        self._gt: Dict[str, Dict] = {}

    def before_train(self) -> None:
        for name in self.names:
            try:
                records = DatasetCatalog.get(name)
            except FileNotFoundError as e:  # e.g. a config's held-back set not prepared: monitoring is optional
                logger.warning(f"DATASETS.UNLABELED_GT {name!r} cannot be loaded; the pseudo-label monitor skips it: "
                               f"{e}")
                continue
            for rec in records:
                self._gt[os.path.abspath(rec["file_name"])] = rec
        if self.class_names is None:
            self.class_names = list(MetadataCatalog.get(self.names[0]).get("thing_classes", []))
        if not self._gt:
            logger.warning(f"DATASETS.UNLABELED_GT {self.names}: no images; the pseudo-label monitor logs nothing")

    def after_step(self) -> None:
        if not self._due():
            return
        # the vis hook runs after this one: keep the batch for it on the steps it draws
        pseudo = self._take_recorded(keep=self.vis_period > 0 and (self.trainer.iter + 1) % self.vis_period == 0)
        if pseudo is None:
            return
        stats = self.measure(*pseudo)
        if stats:
            self.trainer.storage.put_scalars(**stats, smoothing_hint=False)

    def measure(self, unlabeled: List[Dict], detections: List) -> Dict[str, float]:
        """Scalars of one step's pseudo-labels (empty when no image has held-back ground truth)."""
        totals = defaultdict(lambda: defaultdict(float))
        seen = 0
        for d, det in zip(unlabeled, detections):
            rec = self._gt.get(os.path.abspath(d.get("file_name", "")))
            if rec is None:
                continue
            seen += 1
            gt_masks, gt_classes = gt_masks_in_view(rec, d)
            det = det.to("cpu")
            size = tuple(gt_masks.shape[-2:])
            if len(det):
                pred = paste_masks_in_image(det.pred_masks[:, 0].float(), det.pred_boxes, size,
                                            threshold=self.mask_threshold).numpy().astype(bool)
            else:
                pred = np.zeros((0, *size), bool)
            classes, scores = det.pred_classes.numpy(), det.scores.numpy()
            confident = scores >= self.score_thresh
            for c in range(len(self.class_names)):
                for tag, keep in (("", classes == c), (f"@{self.score_thresh:g}", (classes == c) & confident)):
                    for k, v in match_counts(gt_masks[gt_classes == c], pred[keep]).items():
                        totals[(c, tag)][k] += v
        if not seen:
            return {}
        out = {"pseudo_quality/images": float(seen)}
        for (c, tag), counts in totals.items():
            for k, v in _summ(counts).items():
                out[f"pseudo_quality/{self.class_names[c]}/{k}{tag}"] = v
        return out


@TRAINER_HOOKS.register("pseudo_labels")
def build_pseudo_label_hooks(cfg: CfgNode) -> List:
    """The pseudo-label monitor (``SEMI.PSEUDO_MONITOR_PERIOD`` with ``DATASETS.UNLABELED_GT``) and the PNG
    writer (``SEMI.VIS_PERIOD``), in that order: the monitor reads what the model recorded before the
    vis hook frees it."""
    hooks: List = []
    s, threshold = cfg.SEMI, cfg.MODEL.MMT_PSM.MASK_THRESHOLD
    if s.PSEUDO_MONITOR_PERIOD > 0 and cfg.DATASETS.UNLABELED_GT:
        hooks.append(PseudoLabelMonitorHook(s.PSEUDO_MONITOR_PERIOD, cfg.DATASETS.UNLABELED_GT,
                                            s.PSEUDO_MONITOR_SCORE, threshold, vis_period=s.VIS_PERIOD))
    if s.VIS_PERIOD > 0:
        hooks.append(PseudoLabelVisHook(s.VIS_PERIOD, cfg.OUTPUT_DIR, mask_threshold=threshold))
    return hooks
