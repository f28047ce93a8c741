"""Which mapper turns an unlabeled image into what a semi-supervised meta-architecture consumes.

Each method registers a builder under its meta-architecture name, e.g. MMT-PSM's teacher/student views.
"""
from __future__ import annotations

from typing import Callable, Dict

from detectron2.config import CfgNode

UNLABELED_MAPPERS: Dict[str, Callable[[CfgNode], Callable]] = {}


def register_unlabeled_mapper(meta_architecture: str) -> Callable:
    """Decorator: ``builder(cfg) -> mapper`` used for unlabeled images of ``meta_architecture``."""

    def deco(builder: Callable[[CfgNode], Callable]) -> Callable[[CfgNode], Callable]:
        if meta_architecture in UNLABELED_MAPPERS:
            raise KeyError(f"an unlabeled mapper is already registered for {meta_architecture!r}")
        UNLABELED_MAPPERS[meta_architecture] = builder
        return builder

    return deco


def build_unlabeled_mapper(cfg: CfgNode) -> Callable:
    """The unlabeled-image mapper of ``cfg.MODEL.META_ARCHITECTURE``."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in UNLABELED_MAPPERS:
        raise KeyError(
            f"MODEL.META_ARCHITECTURE {name!r} does not use unlabeled images (no mapper registered with "
            "register_unlabeled_mapper); set SEMI.IMS_PER_BATCH_UNLABELED 0 or use a semi-supervised model"
        )
    return UNLABELED_MAPPERS[name](cfg)
