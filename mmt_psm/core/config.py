"""``add_core_config(cfg)``: the teacher-student core's keys (``SEMI.*``, the training streams, split files).

The defaults switch nothing on: a config with only these keys trains a plain supervised model.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

__all__ = ["add_core_config"]


def add_core_config(cfg: CN) -> None:
    """Add the core's keys to ``cfg`` in place (idempotent)."""
    _C = cfg
    if hasattr(_C, "SEMI"):
        return
    # ---------------------------------------------------------------- data
    # Which registered mapper reads the training/test dicts (mmt_psm.core.registry.DATASET_MAPPERS): "cell"
    # (COCO instances), "semantic_slice" (image + label map) or "psm_nuclei" (H&E tile + PSM labels)
    _C.INPUT.DATASET_MAPPER_NAME = "cell"
    # Unlabeled training sets (names registered in DatasetCatalog); empty = supervised training.
    _C.DATASETS.TRAIN_UNLABELED = ()
    # Optional split file (tools/make_splits.py): restricts DATASETS.TRAIN to its labeled ids and adds the
    # rest of the split's base data set to the unlabeled stream.
    _C.DATASETS.SPLIT_FILE = ""
    # Seed of the training streams' order and augmentations (-1: drawn once per run, saved in checkpoints).
    # A resume continues with the uninterrupted run's batches at any iteration and with any
    # DATALOADER.NUM_WORKERS (mmt_psm.core.loader), as long as the mappers draw their randomness from python's,
    # numpy's and torch's global RNGs (seeded per sample from this seed and the sample's stream position).
    _C.DATALOADER.STREAM_SEED = -1


    # ---------------------------------------------------------------- teacher-student core
    _C.SEMI = CN()
    # Images per step from each stream, PER GPU (per training process): unlike Detectron2's SOLVER.IMS_PER_BATCH,
    # which is the total over all GPUs (and is ignored when these are > 0), a run with --num-gpus N trains on
    # N x (IMS_PER_BATCH_LABELED + IMS_PER_BATCH_UNLABELED) images per step. Changing N changes the total batch
    # (scale SOLVER.BASE_LR yourself); the Trainer logs per-GPU and total images per step at start-up.
    _C.SEMI.IMS_PER_BATCH_LABELED = 0
    _C.SEMI.IMS_PER_BATCH_UNLABELED = 0
    # Supervised-only iterations before any unsupervised loss.
    _C.SEMI.BURN_IN_ITERS = 0
    # EMA teacher: decay_t = min(1 - 1/(t+1), EMA_DECAY), updated after every step from EMA_START_ITER.
    _C.SEMI.EMA_DECAY = 0.99
    _C.SEMI.EMA_START_ITER = 0
    # Copy the student into the teacher when burn-in ends.
    _C.SEMI.COPY_TEACHER_AT_BURN_IN = True
    # Skip the burn-in: a supervised run's checkpoint after iteration BURN_IN_ITERS - 1 (same labeled stream and
    # solver) is loaded into student and teacher, and training starts at BURN_IN_ITERS; "" = train the burn-in.
    # The quickstart uses it to share its supervised run's first half with MMT-PSM.
    _C.SEMI.BURN_IN_CHECKPOINT = ""
    # Unsupervised weight w(t) = UNSUP_WEIGHT * ramp(t): exp(-5(1-x)^2) over RAMP_UP_ITERS after burn-in,
    # exp(-12(1-x)^2) over the last RAMP_DOWN_ITERS (0 disables a ramp).
    _C.SEMI.UNSUP_WEIGHT = 1.0
    _C.SEMI.RAMP_UP_ITERS = 0
    _C.SEMI.RAMP_DOWN_ITERS = 0
    # Model used for the reported evaluation: "teacher" or "student" (the other is evaluated too, suffixed).
    _C.SEMI.EVAL_WITH = "teacher"
    # Write PNGs of the teacher's pseudo-labels every N iterations (0 = never).
    _C.SEMI.VIS_PERIOD = 0
    # Every N iterations log the pseudo-labels' precision / recall / matched IoU per class against held-back
    # ground truth (0 = never): DATASETS.UNLABELED_GT names labeled data sets holding (some of) the unlabeled
    # images; their labels are only read by the monitor, never trained on. Also reported for score >= SCORE.
    _C.SEMI.PSEUDO_MONITOR_PERIOD = 0
    _C.SEMI.PSEUDO_MONITOR_SCORE = 0.5
    _C.DATASETS.UNLABELED_GT = ()
    # Also evaluate the model that is not reported (student or teacher, suffixed); False halves eval time.
    _C.SEMI.EVAL_BOTH = True
