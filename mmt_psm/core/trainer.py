"""``Trainer``: Detectron2's DefaultTrainer with the core's data streams, checkpoints and teacher hooks; every
task-specific part comes from the registries (:mod:`mmt_psm.core.registry`).

What it changes, and why:
- the training loader: one labeled stream (+ one unlabeled stream for semi-supervised models), resumable to
  the exact sample (``mmt_psm.core.loader``); mappers by ``INPUT.DATASET_MAPPER_NAME`` (labeled / test) and by
  meta-architecture (unlabeled);
- data sets the config names (e.g. ``DATASETS.REGISTER``) registered on construction, and the registered
  data-set checks (e.g. class counts) run on every training and test set;
- evaluators by each test set's ``evaluator_type``;
- every rank checks the losses of every step (a NaN/inf on one rank stops all ranks, not only rank 0); with
  more than one rank (or AMP), every model's BatchNorm statistics are averaged across ranks after each step, and a
  non-finite step is undone for them and kept from the teacher (``mmt_psm.core.step_guards``);
- for models with an EMA teacher: the EMA hook, and evaluation of the reported model (SEMI.EVAL_WITH) and, when
  SEMI.EVAL_BOTH, of the other one (suffixed); TEST.AUG runs Detectron2's TTA on the reported model;
- the hooks tasks register (e.g. the pseudo-label monitor), after the EMA hook;
- checkpoints: written atomically and holding the optimizer / grad-scaler state (detectron2 v0.6's
  DefaultTrainer omits it) and every rank's RNG state, so ``--resume`` continues exactly.
"""
from __future__ import annotations

import logging
import os
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, SimpleTrainer
from detectron2.engine import hooks as d2_hooks
from detectron2.modeling import GeneralizedRCNN, GeneralizedRCNNWithTTA
from detectron2.utils import comm

from mmt_psm.core.checkpoint import AtomicCheckpointer, TrainingStateHook
from mmt_psm.core.device import resolve_device
from mmt_psm.core.ema import EMATeacherHook, unwrap_model
from mmt_psm.core.loader import TwoStreamLoader, build_stream_loader
from mmt_psm.core.registry import (
    build_dataset_mapper,
    build_evaluator,
    build_task_hooks,
    build_unlabeled_mapper,
    check_datasets,
    register_config_datasets,
)
from mmt_psm.core.splits import check_split_base, register_split
from mmt_psm.core.step_guards import NormStatisticsHook, install_finite_loss_check

logger = logging.getLogger(__name__)


def training_dataset_names(cfg: CfgNode) -> tuple:
    """(labeled names, unlabeled names), with ``DATASETS.SPLIT_FILE`` applied."""
    labeled, unlabeled = list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.TRAIN_UNLABELED)
    if cfg.DATASETS.SPLIT_FILE:
        check_split_base(cfg.DATASETS.SPLIT_FILE, labeled)
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


def log_images_per_step(cfg: CfgNode) -> str:
    """Log (and return) the images of one step per GPU and in total: ``SEMI.IMS_PER_BATCH_*`` are per GPU while
    Detectron2's ``SOLVER.IMS_PER_BATCH`` is the total, so this line says what a run with N GPUs trains on."""
    world = comm.get_world_size()
    n_lab, n_unl = images_per_gpu(cfg)
    source = "SEMI.IMS_PER_BATCH_LABELED/_UNLABELED, per GPU" if cfg.SEMI.IMS_PER_BATCH_LABELED > 0 else \
        "SOLVER.IMS_PER_BATCH, the total"
    msg = (f"Images per step: {n_lab} labeled + {n_unl} unlabeled per GPU x {world} GPU(s) = {n_lab * world} "
           f"labeled + {n_unl * world} unlabeled in total (from {source})")
    logger.info(msg)
    return msg


def load_step_state(step_trainer: SimpleTrainer, state: Dict[str, Any]) -> None:
    """Load a checkpoint's ``_trainer`` state (iteration, optimizer, and with AMP the gradient scaler) into
    Detectron2's Simple/AMPTrainer, across an AMP switch: a checkpoint written without AMP (no or an empty
    ``grad_scaler``) resumes an AMP run with a fresh scaler, one written with AMP resumes an fp32 run without its
    scaler; each with a warning."""
    scaler = getattr(step_trainer, "grad_scaler", None)
    saved = state.get("grad_scaler")
    if scaler is not None and not saved:
        logger.warning("Resuming with AMP from a checkpoint written without it (no grad_scaler state): the gradient "
                       "scaler starts from its initial scale")
        SimpleTrainer.load_state_dict(step_trainer, state)
        return
    if scaler is None and saved:
        logger.warning("Resuming without AMP from a checkpoint written with it: its grad_scaler state is not used")
    step_trainer.load_state_dict(state)


class Trainer(DefaultTrainer):
    """DefaultTrainer for cell/organ segmentation, supervised or teacher-student."""

    def __init__(self, cfg: CfgNode):
        cfg = cfg.clone()
        cfg.defrost()
        resolve_device(cfg)  # no CUDA -> the CPU (one warning), for configs built without load_config too
        if cfg.DATALOADER.STREAM_SEED < 0:
            cfg.DATALOADER.STREAM_SEED = comm.shared_random_seed() % (2**31)
        cfg.freeze()
        register_config_datasets(cfg)  # e.g. DATASETS.REGISTER (no-op when train_net did it already)
        self.data_seed = cfg.DATALOADER.STREAM_SEED
        log_images_per_step(cfg)
        super().__init__(cfg)
        install_finite_loss_check(self._trainer)  # a NaN/inf loss on any rank stops every rank (step_guards)

    # ------------------------------------------------------------------ data
    @classmethod
    def build_train_loader(cls, cfg: CfgNode, start_iter: int = 0):
        labeled_names, unlabeled_names = training_dataset_names(cfg)
        n_lab, n_unl = images_per_gpu(cfg)
        seed, workers = cfg.DATALOADER.STREAM_SEED, cfg.DATALOADER.NUM_WORKERS
        dicts = get_detection_dataset_dicts(
            labeled_names, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        check_datasets(cfg, labeled_names)  # after loading: some loaders set the classes only then
        labeled = build_stream_loader(
            dicts, build_dataset_mapper(cfg, True), n_lab, seed, True, start_iter, workers
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
        return build_detection_test_loader(cfg, dataset_name, mapper=build_dataset_mapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    # ------------------------------------------------------------------ hooks and state
    def build_hooks(self) -> List[Any]:
        self.checkpointer = AtomicCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        hooks = super().build_hooks()
        state_hook = TrainingStateHook()
        extra = [state_hook]
        model = unwrap_model(self._trainer.model)
        if hasattr(model, "teacher_student_pairs") and list(model.teacher_student_pairs()):
            s = self.cfg.SEMI
            extra.insert(0, EMATeacherHook(s.EMA_DECAY, s.EMA_START_ITER, s.BURN_IN_ITERS, s.COPY_TEACHER_AT_BURN_IN))
        if comm.get_world_size() > 1 or self.cfg.SOLVER.AMP.ENABLED:
            # every model's rank-local BN statistics averaged across ranks; a non-finite (e.g. fp16-overflow) step
            # undone for them and kept from the teacher: before the EMA hook
            extra.insert(0, NormStatisticsHook())
        extra += build_task_hooks(self.cfg)
        # after IterationTimer/LRScheduler, before the checkpointer and evaluation, which must see the new teacher
        hooks = hooks[:2] + extra + hooks[2:]
        # every rank's RNG state gathered right before the checkpointer writes it (PreciseBN, which draws, runs
        # earlier); the checkpointer is rank 0's only: the other ranks gather at the same place, before evaluation
        at = next(i for i, h in enumerate(hooks) if isinstance(h, (d2_hooks.PeriodicCheckpointer, d2_hooks.EvalHook)))
        return hooks[:at] + [state_hook.gather_hook()] + hooks[at:]

    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            load_step_state(self._trainer, state_dict["_trainer"])

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        if self.start_iter == 0 and self.cfg.SEMI.BURN_IN_CHECKPOINT:  # a resumed run has its own checkpoint
            self._start_after_burn_in(self.cfg.SEMI.BURN_IN_CHECKPOINT)
        if self.start_iter > 0 or self.data_seed != self.cfg.DATALOADER.STREAM_SEED:
            cfg = self.cfg.clone()
            cfg.defrost()
            cfg.DATALOADER.STREAM_SEED = self.data_seed
            cfg.freeze()
            self.cfg = cfg
            loader = self.build_train_loader(cfg, start_iter=self.start_iter)
            self._trainer.data_loader = loader
            self._trainer._data_loader_iter = iter(loader)

    def _start_after_burn_in(self, path: str) -> None:
        """Skip the burn-in: load a supervised run's checkpoint after iteration ``SEMI.BURN_IN_ITERS - 1`` into
        student and teacher (the copy burn-in would end with) and start at iteration ``BURN_IN_ITERS``, where
        that run's labeled stream and learning-rate schedule left off. The optimizer's momentum starts from
        zero (the teacher-student model has parameters the supervised one lacks)."""
        burn_in = self.cfg.SEMI.BURN_IN_ITERS
        if not hasattr(unwrap_model(self._trainer.model), "teacher_student_pairs"):
            raise ValueError(f"SEMI.BURN_IN_CHECKPOINT={path}: {self.cfg.MODEL.META_ARCHITECTURE} has no teacher; "
                             "use MODEL.WEIGHTS to initialise a supervised model")
        if burn_in <= 0:
            raise ValueError(f"SEMI.BURN_IN_CHECKPOINT={path} needs SEMI.BURN_IN_ITERS > 0 (the iteration the "
                             "teacher-student phase starts at)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SEMI.BURN_IN_CHECKPOINT={path} does not exist (a checkpoint of the "
                                    f"supervised run after iteration {burn_in - 1}, e.g. model_{burn_in - 1:07d}.pth)")
        rest = self.checkpointer.load(path, checkpointables=[])
        done = rest.get("iteration", rest.get("trainer", {}).get("iteration"))
        if done is None:
            raise ValueError(f"SEMI.BURN_IN_CHECKPOINT={path} holds no training iteration (weights only?): use the "
                             f"checkpoint the supervised run wrote after iteration {burn_in - 1}, or MODEL.WEIGHTS "
                             "with the burn-in trained")
        if done != burn_in - 1:
            raise ValueError(f"SEMI.BURN_IN_CHECKPOINT={path} was written after iteration {done}, but "
                             f"SEMI.BURN_IN_ITERS={burn_in} needs the checkpoint after iteration {burn_in - 1}")
        self.start_iter = burn_in
        # the schedule's learning rate at iteration `burn_in` (the LRScheduler hook steps after every iteration)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
            self.scheduler.last_epoch = burn_in - 1
            self.scheduler.step()
        logger.info(f"Teacher-student phase from {path}: student and teacher loaded, starting at iteration "
                    f"{burn_in}, learning rate {self.scheduler.get_last_lr()[0]:.6g}")

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
        if not cfg.SEMI.EVAL_BOTH:
            return results
        with inner.evaluate_with(other):
            other_results = super().test(cfg, model, evaluators)
        return _merge_suffixed(results, other_results, f"_{other}")


    @classmethod
    def test_with_TTA(cls, cfg: CfgNode, model: torch.nn.Module) -> Dict:
        """Detectron2's test-time augmentation (TEST.AUG) of the reported detector, results suffixed ``_TTA``.

        For a teacher-student model this is the ``SEMI.EVAL_WITH`` network (a plain ``GeneralizedRCNN``)."""
        inner = unwrap_model(model)
        if hasattr(inner, "evaluate_with"):
            inner = getattr(inner, cfg.SEMI.EVAL_WITH)
        if not isinstance(inner, GeneralizedRCNN):
            raise ValueError(
                f"TEST.AUG needs a GeneralizedRCNN detector (Detectron2's GeneralizedRCNNWithTTA); "
                f"{cfg.MODEL.META_ARCHITECTURE} predicts with a {type(inner).__name__}: set TEST.AUG.ENABLED False"
            )
        tta = GeneralizedRCNNWithTTA(cfg, inner)
        tta.train(inner.training)  # inference_context restores this mode: keep the teacher in eval mode
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, tta, evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())


def _merge_suffixed(results: Dict, other: Dict, suffix: str) -> Dict:
    """``{task: metrics}`` (or ``{dataset: {task: metrics}}``) with ``other``'s tasks added as ``task+suffix``."""
    merged = OrderedDict(results)
    for key, value in other.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            merged[key] = _merge_suffixed(results.get(key, {}), value, suffix)
        else:
            merged[key + suffix] = value
    return merged
