"""``NucleiInstanceEvaluator``: nucleus instances from a semantic model's foreground probability, scored
against uint16 instance maps (``instance_file_name``) with :mod:`mmt_psm.nuclei.metrics`.

Used for data sets with ``evaluator_type "nuclei_instances"`` (``monuseg_test``, PSM label sets with
instances). Reports AJI (per-image mean), AJI_pooled, F1, Dice, IoU, COCO mask AP and the same metrics under
the PSM paper's protocol (suffix ``_paper``: centre crop ``PSM.PAPER_CROP``, connected-component GT).
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import cv2
import numpy as np
from detectron2.config import CfgNode
from detectron2.evaluation import DatasetEvaluator

from mmt_psm.core.atomic import write_json
from mmt_psm.core.registry import EVALUATORS
from mmt_psm.nuclei.instances import instances_from_probability
from mmt_psm.nuclei.metrics import coco_mask_ap, image_scores, paper_protocol_scores, summarize_scores

__all__ = ["NucleiInstanceEvaluator", "foreground_probability", "instance_scores_of"]

logger = logging.getLogger(__name__)


def foreground_probability(sem_seg_logits) -> np.ndarray:
    """(H, W) float32 softmax probability of class 1 from (C, H, W) logits (a torch tensor)."""
    return sem_seg_logits.float().softmax(dim=0)[1].detach().cpu().numpy().astype(np.float32)


def instance_scores_of(instances: np.ndarray, prob: np.ndarray) -> List[float]:
    """Mean foreground probability of instance ids 1..N (the detection score for COCO AP)."""
    n = int(instances.max())
    if n == 0:
        return []
    sums = np.bincount(instances.ravel(), weights=prob.ravel(), minlength=n + 1)[1:]
    areas = np.bincount(instances.ravel(), minlength=n + 1)[1:]
    return (sums / np.maximum(areas, 1)).tolist()


class NucleiInstanceEvaluator(DatasetEvaluator):
    """Scores ``sem_seg`` outputs as nucleus instances (connected components, or watershed: PSM.INSTANCES)."""

    def __init__(self, cfg: CfgNode, dataset_name: str, output_dir: Optional[str] = None):
        self.dataset_name, self.output_dir = dataset_name, output_dir
        self.inst = cfg.PSM.INSTANCES
        self.points = cfg.PSM.POINTS
        self.paper_crop = int(cfg.PSM.PAPER_CROP)
        self.reset()

    def reset(self) -> None:
        self._scores: List[Dict] = []
        self._paper: List[Dict] = []
        self._maps: List[tuple] = []

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            if "instance_file_name" not in inp:
                raise ValueError(f"{self.dataset_name}: {inp['file_name']} has no instance_file_name to score")
            gt = cv2.imread(inp["instance_file_name"], cv2.IMREAD_UNCHANGED)
            if gt is None:
                raise OSError(f"cannot read instance map {inp['instance_file_name']}")
            prob = foreground_probability(out["sem_seg"])
            pred = instances_from_probability(
                prob, self.inst.THRESHOLD, self.inst.MIN_SIZE, watershed=self.inst.WATERSHED,
                sigma=self.points.SIGMA, min_distance=self.points.MIN_DISTANCE, surface=self.inst.SURFACE)
            self._scores.append(image_scores(gt, pred))
            if self.paper_crop > 0:
                self._paper.append(paper_protocol_scores(gt, pred, self.paper_crop))
            self._maps.append((gt, pred, instance_scores_of(pred, prob)))

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        res = summarize_scores(self._scores)
        if self._maps:
            res.update(coco_mask_ap(*zip(*self._maps)))
        if self._paper:
            res.update({f"{k}_paper": v for k, v in summarize_scores(self._paper).items()})
        if self.output_dir:
            path = os.path.join(self.output_dir, "nuclei_metrics.json")
            write_json(path, {"summary": res, "per_image": self._scores})
        logger.info(f"{self.dataset_name}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()
                                                          if isinstance(v, float)))
        return {"nuclei": res}


@EVALUATORS.register("nuclei_instances")
def build_nuclei_evaluator(cfg: CfgNode, dataset_name: str, output_folder: str) -> NucleiInstanceEvaluator:
    """Nucleus-instance evaluation of a ``nuclei_instances`` data set (e.g. ``monuseg_test``)."""
    return NucleiInstanceEvaluator(cfg, dataset_name, output_folder)
