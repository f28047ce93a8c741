"""``Trainer``: Detectron2's DefaultTrainer with this project's data, evaluators and semi-supervised hooks.

What it changes, and why:
- the training loader: one labeled stream (+ one unlabeled stream for semi-supervised models), resumable to
  the exact sample (``mmt_psm.data.loader``);
- evaluators: COCO AP (bbox, segm) + the cell metrics (AJI, F1, Dice);
- for models with a teacher: the EMA hook, and evaluation of teacher and student (the other one suffixed);
- checkpoints: written atomically and holding the optimizer / grad-scaler state (detectron2 v0.6's
  DefaultTrainer omits it) and the RNG state, so ``--resume`` continues exactly.
"""
from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.utils import comm

from mmt_psm.data.loader import TwoStreamLoader, build_stream_loader
from mmt_psm.data.mapper import CellDatasetMapper
from mmt_psm.data.splits import register_split
from mmt_psm.data.unlabeled import build_unlabeled_mapper
from mmt_psm.engine.checkpoint import AtomicCheckpointer
from mmt_psm.engine.hooks import EMATeacherHook, TrainingStateHook, unwrap_model
from mmt_psm.engine.vis_hook import PseudoLabelVisHook
from mmt_psm.evaluation.cell_evaluator import CellInstanceEvaluator

logger = logging.getLogger(__name__)


def training_dataset_names(cfg: CfgNode) -> tuple:
    """(labeled names, unlabeled names), with ``DATASETS.SPLIT_FILE`` applied."""
    labeled, unlabeled = list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.TRAIN_UNLABELED)
    if cfg.DATASETS.SPLIT_FILE:
        lab_name, unl_name = register_split(cfg.DATASETS.SPLIT_FILE)
        labeled, unlabeled = [lab_name], unlabeled + [unl_name]
    return labeled, unlabeled


def images_per_gpu(cfg: CfgNode) -> tuple:
    """(labeled, unlabeled) images per step and per GPU."""
    world = comm.get_world_size()
    if cfg.SEMI.IMS_PER_BATCH_LABELED > 0:
        return cfg.SEMI.IMS_PER_BATCH_LABELED, cfg.SEMI.IMS_PER_BATCH_UNLABELED
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is not divisible by {world} GPUs")
    return cfg.SOLVER.IMS_PER_BATCH // world, 0


class Trainer(DefaultTrainer):
    """DefaultTrainer for cell/organ segmentation, supervised or teacher-student."""

    def __init__(self, cfg: CfgNode):
        cfg = cfg.clone()
        cfg.defrost()
        if cfg.DATALOADER.STREAM_SEED < 0:
            cfg.DATALOADER.STREAM_SEED = comm.shared_random_seed() % (2**31)
        cfg.freeze()
        self.data_seed = cfg.DATALOADER.STREAM_SEED
        super().__init__(cfg)

    # ------------------------------------------------------------------ data
    @classmethod
    def build_train_loader(cls, cfg: CfgNode, start_iter: int = 0):
        labeled_names, unlabeled_names = training_dataset_names(cfg)
        n_lab, n_unl = images_per_gpu(cfg)
        seed, workers = cfg.DATALOADER.STREAM_SEED, cfg.DATALOADER.NUM_WORKERS
        dicts = get_detection_dataset_dicts(
            labeled_names, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        labeled = build_stream_loader(
            dicts, CellDatasetMapper(cfg, True), n_lab, seed, True, start_iter, workers
        )
        if n_unl <= 0 or not unlabeled_names:
            if n_unl > 0:
                logger.warning("SEMI.IMS_PER_BATCH_UNLABELED > 0 but no unlabeled data set: supervised training")
            return TwoStreamLoader(labeled)
        unl_dicts = get_detection_dataset_dicts(unlabeled_names, filter_empty=False)
        if not unl_dicts:
            logger.warning(f"unlabeled data sets {unlabeled_names} are empty: supervised training")
            return TwoStreamLoader(labeled)
        for d in unl_dicts:
            d.pop("annotations", None)
        unlabeled = build_stream_loader(
            unl_dicts, build_unlabeled_mapper(cfg), n_unl, seed + 1, False, start_iter, workers
        )
        return TwoStreamLoader(labeled, unlabeled)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(cfg, dataset_name, mapper=CellDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluators = [CellInstanceEvaluator(dataset_name, output_dir=output_folder)]
        if MetadataCatalog.get(dataset_name).get("evaluator_type", "cell") == "cell":
            evaluators.insert(0, COCOEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=output_folder))
        return DatasetEvaluators(evaluators)

    # ------------------------------------------------------------------ hooks and state
    def build_hooks(self) -> List[Any]:
        self.checkpointer = AtomicCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        hooks = super().build_hooks()
        extra = [TrainingStateHook()]
        if hasattr(unwrap_model(self._trainer.model), "teacher_student_pairs"):
            s = self.cfg.SEMI
            extra.insert(0, EMATeacherHook(s.EMA_DECAY, s.EMA_START_ITER, s.BURN_IN_ITERS, s.COPY_TEACHER_AT_BURN_IN))
        if self.cfg.SEMI.VIS_PERIOD > 0:
            extra.append(
                PseudoLabelVisHook(self.cfg.SEMI.VIS_PERIOD, self.cfg.OUTPUT_DIR,
                                   mask_threshold=self.cfg.MODEL.MMT_PSM.MASK_THRESHOLD)
            )
        # after IterationTimer/LRScheduler, before the checkpointer and evaluation, which must see the new teacher
        return hooks[:2] + extra + hooks[2:]

    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        if self.start_iter > 0 or self.data_seed != self.cfg.DATALOADER.STREAM_SEED:
            cfg = self.cfg.clone()
            cfg.defrost()
            cfg.DATALOADER.STREAM_SEED = self.data_seed
            cfg.freeze()
            self.cfg = cfg
            loader = self.build_train_loader(cfg, start_iter=self.start_iter)
            self._trainer.data_loader = loader
            self._trainer._data_loader_iter = iter(loader)

    # ------------------------------------------------------------------ evaluation
    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None):
        """Evaluate; for teacher-student models evaluate both, the non-reported one suffixed."""
        inner = unwrap_model(model)
        if not hasattr(inner, "evaluate_with"):
            return super().test(cfg, model, evaluators)
        main = cfg.SEMI.EVAL_WITH
        other = "student" if main == "teacher" else "teacher"
        with inner.evaluate_with(main):
            results = super().test(cfg, model, evaluators)
        with inner.evaluate_with(other):
            other_results = super().test(cfg, model, evaluators)
        return _merge_suffixed(results, other_results, f"_{other}")


def _merge_suffixed(results: Dict, other: Dict, suffix: str) -> Dict:
    """``{task: metrics}`` (or ``{dataset: {task: metrics}}``) with ``other``'s tasks added as ``task+suffix``."""
    merged = OrderedDict(results)
    for key, value in other.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            merged[key] = _merge_suffixed(results.get(key, {}), value, suffix)
        else:
            merged[key + suffix] = value
    return merged
