"""Registries through which each task contributes to the shared ``Trainer`` (registration by import).

The Trainer names no method and reads no method's keys; a task package registers, when imported:
- ``DATASET_MAPPERS``: ``INPUT.DATASET_MAPPER_NAME`` -> ``builder(cfg, is_train)`` of labeled/test images;
- ``UNLABELED_MAPPERS``: ``MODEL.META_ARCHITECTURE`` -> ``builder(cfg)`` of unlabeled images (e.g. MMT-PSM's
  teacher/student views);
- ``EVALUATORS``: a data set's ``evaluator_type`` metadata -> ``builder(cfg, dataset_name, output_folder)``
  (``DEFAULT_EVALUATOR_TYPE`` for data sets without one);
- ``DATASET_CHECKS``: ``check(cfg, dataset_names)`` run on the training and test sets once they are loaded;
- ``CONFIG_DATASETS``: ``register(cfg)`` of data sets the config names (e.g. ``DATASETS.REGISTER``);
- ``TRAINER_HOOKS``: ``builder(cfg) -> [hooks]`` added after the EMA hook, before checkpointing/evaluation.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog

__all__ = [
    "DATASET_MAPPERS", "UNLABELED_MAPPERS", "EVALUATORS", "DATASET_CHECKS", "CONFIG_DATASETS", "TRAINER_HOOKS",
    "DEFAULT_EVALUATOR_TYPE", "TaskRegistry", "register_unlabeled_mapper", "build_dataset_mapper",
    "build_unlabeled_mapper",
    "build_evaluator", "check_datasets", "register_config_datasets", "build_task_hooks",
]



class TaskRegistry(Dict[str, Callable]):
    """name -> callable, filled by ``@REGISTRY.register(name)`` when a task package is imported; insertion order
    is kept (checks and hooks run in the order the tasks were imported)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def deco(obj: Callable) -> Callable:
            if name in self:
                raise KeyError(f"{name!r} is already registered in {self.what}")
            self[name] = obj
            return obj

        return deco


DATASET_MAPPERS = TaskRegistry("DATASET_MAPPERS")
EVALUATORS = TaskRegistry("EVALUATORS")
DATASET_CHECKS = TaskRegistry("DATASET_CHECKS")
CONFIG_DATASETS = TaskRegistry("CONFIG_DATASETS")
TRAINER_HOOKS = TaskRegistry("TRAINER_HOOKS")
UNLABELED_MAPPERS = TaskRegistry("UNLABELED_MAPPERS")
# data sets without ``evaluator_type`` metadata are COCO instance sets (Detectron2's own convention)
DEFAULT_EVALUATOR_TYPE = "coco"


def register_unlabeled_mapper(meta_architecture: str) -> Callable:
    """Decorator: ``builder(cfg) -> mapper`` used for unlabeled images of ``meta_architecture``."""
    if meta_architecture in UNLABELED_MAPPERS:
        raise KeyError(f"an unlabeled mapper is already registered for {meta_architecture!r}")
    return UNLABELED_MAPPERS.register(meta_architecture)


def build_dataset_mapper(cfg: CfgNode, is_train: bool) -> Callable:
    """The mapper named by ``INPUT.DATASET_MAPPER_NAME``."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in DATASET_MAPPERS:
        known = " or ".join(repr(n) for n in sorted(DATASET_MAPPERS))
        raise ValueError(f"INPUT.DATASET_MAPPER_NAME must be {known}, got {name!r}")
    return DATASET_MAPPERS[name](cfg, is_train)


def build_unlabeled_mapper(cfg: CfgNode) -> Callable:
    """The unlabeled-image mapper of ``cfg.MODEL.META_ARCHITECTURE``."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in UNLABELED_MAPPERS:
        raise KeyError(
            f"MODEL.META_ARCHITECTURE {name!r} does not use unlabeled images (no mapper registered with "
            "register_unlabeled_mapper); set SEMI.IMS_PER_BATCH_UNLABELED 0 or use a semi-supervised model"
        )
    return UNLABELED_MAPPERS[name](cfg)


def build_evaluator(cfg: CfgNode, dataset_name: str, output_folder: str) -> Any:
    """The evaluator registered for the data set's ``evaluator_type`` (``DEFAULT_EVALUATOR_TYPE`` when unset)."""
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", None) or DEFAULT_EVALUATOR_TYPE
    if kind not in EVALUATORS:
        known = ", ".join(EVALUATORS)
        raise ValueError(f"no evaluator for data set {dataset_name!r}: evaluator_type {kind!r} is not one of {known}")
    return EVALUATORS[kind](cfg, dataset_name, output_folder)


def check_datasets(cfg: CfgNode, dataset_names: Sequence[str]) -> None:
    """Run every registered data-set check (e.g. class counts against the model's) on ``dataset_names``."""
    for check in DATASET_CHECKS.values():
        check(cfg, dataset_names)


def register_config_datasets(cfg: CfgNode) -> None:
    """Register the data sets that ``cfg`` itself names (no-op when it names none)."""
    for register in CONFIG_DATASETS.values():
        register(cfg)


def build_task_hooks(cfg: CfgNode) -> List[Any]:
    """The hooks every task contributes for ``cfg`` (each builder returns [] when its keys are off)."""
    hooks: List[Any] = []
    for builder in TRAINER_HOOKS.values():
        hooks += builder(cfg)
    return hooks
