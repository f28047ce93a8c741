"""Cells: supervised Mask R-CNN and MMT-PSM (Zhou et al., MICCAI 2020) on Detectron2's ``GeneralizedRCNN``.

Importing registers the ``MMTPSMRCNN`` meta-architecture, the ``cell`` mapper and MMT-PSM's unlabeled views,
the COCO AP + cell-metric evaluators, the pseudo-label monitor / PNG hooks, ``DATASETS.REGISTER`` data sets and
the built-in cell data sets (``isbi2015_*``, ``isbi2014_synth45``, ``synthetic_*``).
"""
from mmt_psm.instance import (  # noqa: F401  (registration by import)
    cell_evaluator,
    mapper,
    mmt_psm_rcnn,
    pseudo_label_monitor,
    user_datasets,
    view_mapper,
)
from mmt_psm.instance.config import add_instance_config
from mmt_psm.instance.datasets import register_all
from mmt_psm.instance.mmt_psm_rcnn import MMTPSMRCNN

register_all()

__all__ = ["MMTPSMRCNN", "add_instance_config"]
