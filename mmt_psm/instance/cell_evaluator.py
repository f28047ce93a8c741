"""Detectron2 evaluator for the cell field's instance metrics: AJI, object F1 (IoU > 0.5), Dice, pixel IoU.

Complements ``COCOEvaluator`` (AP): use both via ``DatasetEvaluators``. GT comes from
``DatasetCatalog.get(dataset_name)`` (Detectron2 standard dicts: ``category_id`` already contiguous, masks as
RLE or polygons); predictions are ``outputs["instances"]`` with ``scores >= score_thresh``.

Aggregation over the data set, per class (e.g. cytoplasm, nucleus):

* ``AJI``: the MEAN OF PER-IMAGE AJI, C_k / U_k per image k (the MoNuSeg challenge's ranking, Kumar et al.
  2020); an image with neither GT nor prediction of the class scores 1.0, one with only predictions 0.0.
* ``AJI_pooled``: sum of C over all images / sum of U over all images (one AJI of the data set as a single
  image; large or crowded images weigh more; an image with nothing in it adds nothing).
* ``F1``: from tp, fp, fn summed over images (one-to-one matching at IoU > 0.5 per image).
* ``Dice`` and ``IoU`` (pixel): mean over images of the per-image score of the union masks; an image with
  neither GT nor prediction of the class scores 1.0 (see :mod:`mmt_psm.core.object_metrics`).

Results are in percent, like ``COCOEvaluator``: ``{"cell": {"AJI-<class>", "F1-<class>", "Dice-<class>",
"IoU-<class>", "AJI_pooled-<class>" for every class, and "AJI", "F1", "Dice", "IoU", "AJI_pooled" (means over
classes)}}``. The score threshold is ``TEST.CELL_SCORE_THRESH`` in the Trainer.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from tabulate import tabulate

from mmt_psm.core.object_metrics import class_counts, f1_from_counts
from mmt_psm.core.registry import EVALUATORS
from mmt_psm.instance.coco_ap import build_coco_evaluator, has_instance_annotations
from mmt_psm.instance.coco_io import annotation_to_mask
from mmt_psm.instance.user_datasets import check_num_classes

__all__ = ["CellInstanceEvaluator", "build_cell_evaluators"]

METRICS = ("AJI", "F1", "Dice", "IoU", "AJI_pooled")


class CellInstanceEvaluator(DatasetEvaluator):
    """Per-class AJI / object F1 / Dice / pixel IoU of instance-mask predictions on a registered data set."""

    def __init__(
        self,
        dataset_name: str,
        score_thresh: float = 0.5,
        output_dir: Optional[str] = None,
        distributed: bool = True,
    ) -> None:
        """
        Args:
            dataset_name: a DatasetCatalog name whose dicts carry instance masks (``segmentation``).
            score_thresh: predictions below this score are dropped (these metrics have no ranking, unlike AP).
            output_dir: if set, per-image metrics are written to ``cell_metrics.json`` there.
            distributed: gather results from all ranks; only the main process returns them.
        """
        self._logger = logging.getLogger(__name__)
        self._dataset_name = dataset_name
        self._score_thresh = float(score_thresh)
        self._output_dir = output_dir
        self._distributed = distributed
        # Load first: loaders such as load_coco_json fill in thing_classes on the metadata while loading.
        self._gt: Dict[Any, Dict[str, Any]] = {d["image_id"]: d for d in DatasetCatalog.get(dataset_name)}
        self._class_names: List[str] = list(MetadataCatalog.get(dataset_name).thing_classes)
        self._per_image: List[Dict[str, Any]] = []

    def reset(self) -> None:
        self._per_image = []

    def _gt_masks(self, record: Dict[str, Any]) -> List[List[np.ndarray]]:
        """GT masks of one image, one list per contiguous class id (crowd regions are ignored, as in COCO)."""
        h, w = int(record["height"]), int(record["width"])
        per_class: List[List[np.ndarray]] = [[] for _ in self._class_names]
        for ann in record.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            per_class[int(ann["category_id"])].append(annotation_to_mask(ann["segmentation"], h, w))
        return per_class

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        """Score each image against its GT right away and keep only the per-class counts (small)."""
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                continue
            image_id = inp["image_id"]
            if image_id not in self._gt:
                raise KeyError(f"image_id {image_id} is not in data set {self._dataset_name}")
            record = self._gt[image_id]
            gt = self._gt_masks(record)
            inst = out["instances"].to("cpu")
            keep = inst.scores >= self._score_thresh
            pred_masks = inst.pred_masks[keep].numpy().astype(bool, copy=False)
            pred_classes = inst.pred_classes[keep].numpy()
            if pred_masks.shape[1:] != (int(record["height"]), int(record["width"])):
                raise ValueError(
                    f"predicted masks {pred_masks.shape[1:]} differ from image size of {image_id} "
                    f"({record['height']}, {record['width']})"
                )
            classes = {}
            for c, name in enumerate(self._class_names):
                of_c = pred_classes == c
                # a 1-class set (or an image whose predictions are all class c) keeps the stack uncopied
                g, p = gt[c], (pred_masks if of_c.all() else pred_masks[of_c])
                classes[name] = class_counts(g, p)._asdict()
            self._per_image.append({"image_id": image_id, "classes": classes})

    def evaluate(self) -> OrderedDict[str, Dict[str, float]]:
        """Gather per-image counts, aggregate per class (see module docstring), log a table; percent."""
        if self._distributed and comm.get_world_size() > 1:
            comm.synchronize()
            per_image = list(itertools.chain(*comm.gather(self._per_image, dst=0)))
            if not comm.is_main_process():
                return OrderedDict()
        else:
            per_image = self._per_image
        if len(per_image) == 0:
            self._logger.warning("[CellInstanceEvaluator] Did not receive valid predictions.")
            return OrderedDict()

        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            with PathManager.open(os.path.join(self._output_dir, "cell_metrics.json"), "w") as f:
                json.dump(per_image, f)

        results: Dict[str, float] = {}
        rows = []
        for name in self._class_names:
            stats = [img["classes"][name] for img in per_image]
            c = sum(s["aji_c"] for s in stats)
            u = sum(s["aji_u"] for s in stats)
            f1 = f1_from_counts(*(sum(s[k] for s in stats) for k in ("tp", "fp", "fn")))
            per_image_aji = [s["aji_c"] / s["aji_u"] if s["aji_u"] > 0 else 1.0 for s in stats]
            scores = {
                "AJI": float(np.mean(per_image_aji)),
                "F1": f1.f1,
                "Dice": float(np.mean([s["dice"] for s in stats])),
                "IoU": float(np.mean([s["iou"] for s in stats])),
                "AJI_pooled": c / u if u > 0 else 1.0,  # no objects and no predictions anywhere: nothing missed
            }
            for m in METRICS:
                results[f"{m}-{name}"] = 100.0 * scores[m]
            rows.append(
                [name] + [100.0 * scores[m] for m in METRICS] + [100 * f1.precision, 100 * f1.recall]
                + [f1.tp, f1.fp, f1.fn]
            )
        for m in METRICS:
            results[m] = float(np.mean([results[f"{m}-{n}"] for n in self._class_names]))

        table = tabulate(
            rows,
            headers=["class", *METRICS, "Prec", "Rec", "TP", "FP", "FN"],
            tablefmt="pipe",
            floatfmt=".2f",
            numalign="left",
        )
        self._logger.info(
            f"Cell metrics on {self._dataset_name} ({len(per_image)} images, score >= {self._score_thresh}; "
            f"AJI = mean of per-image AJI, AJI_pooled = sum C / sum U over images, F1 from summed counts, "
            f"Dice/IoU mean over images):\n{table}"
        )
        return OrderedDict({"cell": copy.deepcopy(results)})


@EVALUATORS.register("cell")
@EVALUATORS.register("coco")
def build_cell_evaluators(cfg: CfgNode, dataset_name: str, output_folder: str) -> DatasetEvaluators:
    """COCO AP (bbox, segm) + the cell metrics (AJI, F1, Dice at ``TEST.CELL_SCORE_THRESH``) of an instance set."""
    if not has_instance_annotations(dataset_name):
        meta = MetadataCatalog.get(dataset_name)
        raise ValueError(f"no evaluator for data set {dataset_name!r} (evaluator_type "
                         f"{meta.get('evaluator_type', None)!r}, unlabeled={meta.get('unlabeled', False)})")
    cell = CellInstanceEvaluator(dataset_name, score_thresh=cfg.TEST.CELL_SCORE_THRESH, output_dir=output_folder)
    check_num_classes(cfg, [dataset_name])  # the evaluator has loaded the data set: its classes are known
    return DatasetEvaluators([build_coco_evaluator(cfg, dataset_name, output_folder), cell])
