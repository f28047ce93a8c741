"""Which mapper turns an unlabeled image into what a semi-supervised meta-architecture consumes.

Each method registers a builder under its meta-architecture name, e.g. MMT-PSM's teacher/student views.
"""
from __future__ import annotations

from typing import Callable

from detectron2.config import CfgNode
from fvcore.common.registry import Registry

UNLABELED_MAPPER_REGISTRY = Registry("UNLABELED_MAPPER")
UNLABELED_MAPPER_REGISTRY.__doc__ = """
Maps ``cfg.MODEL.META_ARCHITECTURE`` to a callable ``builder(cfg) -> mapper`` for unlabeled images.
"""


def build_unlabeled_mapper(cfg: CfgNode) -> Callable:
    """The unlabeled-image mapper of ``cfg.MODEL.META_ARCHITECTURE``."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in UNLABELED_MAPPER_REGISTRY:
        raise KeyError(
            f"MODEL.META_ARCHITECTURE {name!r} does not use unlabeled images (no mapper registered in "
            f"UNLABELED_MAPPER_REGISTRY); set SEMI.IMS_PER_BATCH_UNLABELED 0 or use a semi-supervised model"
        )
    return UNLABELED_MAPPER_REGISTRY.get(name)(cfg)
