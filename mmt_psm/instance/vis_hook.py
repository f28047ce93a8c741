"""``PseudoLabelVisHook``: PNGs (and TensorBoard images) of the teacher's pseudo-labels during training.

Seeing what the teacher hands to the student is the quickest check that a semi-supervised run is healthy
(e.g. empty or all-background pseudo-labels after burn-in mean the unsupervised losses teach nothing).

Protocol with the model (no model change needed): a semi-supervised meta-architecture stores
``self._last_pseudo = (unlabeled_dicts, detections)`` in a forward that computes unsupervised losses while its
``record_pseudo_labels`` is True (the hook sets it only for the steps it draws, so no batch is kept otherwise), where
the dicts carry ``teacher_views`` (uint8 ``CxHxW`` tensors; view 0 is the frame of the detections) and the
detections are ``Instances`` with ``pred_boxes``, ``pred_classes``, ``scores`` and ``pred_masks``
(``N x 1 x M x M`` probabilities). Before every step it will draw, the hook sets ``_last_pseudo = None``, so a
value found after the step is from that step (never a stale one, e.g. during burn-in); after drawing it sets it
to ``None`` again so the batch is not kept alive.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np
from detectron2.data.catalog import Metadata
from detectron2.engine import HookBase
from detectron2.utils import comm

from mmt_psm.core.ema import unwrap_model
from mmt_psm.instance.visualize import cfg_metadata, draw_pseudo_labels, write_png

__all__ = ["PseudoLabelRecordingHook", "PseudoLabelVisHook"]

logger = logging.getLogger(__name__)


class PseudoLabelRecordingHook(HookBase):
    """Base of the hooks that read the model's recorded pseudo-labels every ``period`` iterations (main process):
    before a due step it clears ``_last_pseudo`` and sets ``record_pseudo_labels``."""

    period = 0

    def _due(self) -> bool:
        return self.period > 0 and (self.trainer.iter + 1) % self.period == 0 and comm.is_main_process()

    def before_step(self) -> None:
        if self._due():
            model = unwrap_model(self.trainer.model)
            model._last_pseudo = None
            model.record_pseudo_labels = True

    def _take_recorded(self, keep: bool = False):
        """After a due step: stop recording and return ``(unlabeled, detections)`` (None when the step had no
        unsupervised losses); the model's reference is dropped unless ``keep`` (a later hook still reads it)."""
        model = unwrap_model(self.trainer.model)
        model.record_pseudo_labels = False
        pseudo = getattr(model, "_last_pseudo", None)
        if not keep:
            model._last_pseudo = None
        return pseudo


class PseudoLabelVisHook(PseudoLabelRecordingHook):
    """Every ``period`` iterations (when ``(iter + 1) % period == 0``, like Detectron2's periodic hooks), draw
    the pseudo-labels of the first ``max_images`` unlabeled images of that step on their teacher view 0 and
    write ``<output_dir>/pseudo_labels/iter_XXXXXXX.png`` (the iteration that just ran) plus
    ``storage.put_image("pseudo_labels", ...)``. Steps without unsupervised losses (burn-in, supervised
    models) are skipped. Main process only.

    ``image_format`` and ``metadata`` (class names) default to the trainer's ``cfg.INPUT.FORMAT`` and
    ``MetadataCatalog.get(cfg.DATASETS.TRAIN[0])``.
    """

    def __init__(
        self,
        period: int,
        output_dir: str,
        max_images: int = 2,
        mask_threshold: float = 0.5,
        image_format: Optional[str] = None,
        metadata: Optional[Metadata] = None,
    ):
        self.period, self.max_images, self.mask_threshold = int(period), int(max_images), float(mask_threshold)
        self.output_dir = os.path.join(output_dir, "pseudo_labels")
        self.image_format, self.metadata = image_format, metadata

    def before_train(self) -> None:
        cfg = getattr(self.trainer, "cfg", None)
        if cfg is not None:
            self.image_format = self.image_format or cfg.INPUT.FORMAT
            self.metadata = self.metadata if self.metadata is not None else cfg_metadata(cfg)

    def after_step(self) -> None:
        if not self._due():
            return
        pseudo = self._take_recorded()
        if pseudo is None:
            logger.debug(f"iter {self.trainer.iter}: no unsupervised step, no pseudo-labels to draw")
            return
        unlabeled, detections = pseudo
        it = self.trainer.iter
        image = draw_pseudo_labels(
            unlabeled, detections, self.image_format or "BGR", self.metadata, self.max_images,
            self.mask_threshold, title=f"iter {it}",
        )
        write_png(os.path.join(self.output_dir, f"iter_{it:07d}.png"), image)
        self.trainer.storage.put_image("pseudo_labels", image.transpose(2, 0, 1).astype(np.float32) / 255.0)
