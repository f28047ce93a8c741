"""COCO AP (bbox, segm) for any COCO-format instance data set, counting up to ``TEST.DETECTIONS_PER_IMAGE``.

Detectron2's ``COCOEvaluator`` scores at most ``max_dets_per_image`` detections per image (COCOeval's default
is 100, fewer than a crowded cell image holds). The argument exists in later Detectron2 releases and in the
build this project installs; an older build without it (e.g. a v0.6 checkout) still works, with a warning
that AP then counts only the 100 highest-scoring detections of each image.
"""
from __future__ import annotations

import inspect
import logging
from typing import Optional

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator

__all__ = ["INSTANCE_EVALUATOR_TYPES", "has_instance_annotations", "build_coco_evaluator",
           "supports_max_dets"]

logger = logging.getLogger(__name__)

# evaluator_type values of data sets with COCO-style instance annotations (None: not set, e.g. a data set
# registered with plain DatasetCatalog.register)
INSTANCE_EVALUATOR_TYPES = (None, "cell", "coco")


def has_instance_annotations(dataset_name: str) -> bool:
    """True for a data set evaluated with COCO AP + cell metrics (not semantic, not an unlabeled set)."""
    meta = MetadataCatalog.get(dataset_name)
    return meta.get("evaluator_type", None) in INSTANCE_EVALUATOR_TYPES and not meta.get("unlabeled", False)


def supports_max_dets() -> bool:
    """Whether the installed ``COCOEvaluator`` takes ``max_dets_per_image``."""
    return "max_dets_per_image" in inspect.signature(COCOEvaluator.__init__).parameters


def build_coco_evaluator(cfg: CfgNode, dataset_name: str, output_dir: Optional[str] = None) -> COCOEvaluator:
    """``COCOEvaluator(tasks=("bbox", "segm"))`` with ``max_dets_per_image = TEST.DETECTIONS_PER_IMAGE``."""
    kwargs = {"tasks": ("bbox", "segm"), "output_dir": output_dir}
    max_dets = int(cfg.TEST.DETECTIONS_PER_IMAGE)
    if supports_max_dets():
        kwargs["max_dets_per_image"] = max_dets
    elif max_dets != 100:
        logger.warning(
            f"this Detectron2's COCOEvaluator has no max_dets_per_image: AP on {dataset_name} counts the 100 "
            f"best detections per image, not TEST.DETECTIONS_PER_IMAGE={max_dets}"
        )
    return COCOEvaluator(dataset_name, **kwargs)
