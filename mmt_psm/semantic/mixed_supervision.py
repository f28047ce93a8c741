"""Mixed supervision with confidence maximisation + KL distillation (Dolz et al., IPMI 2021; Liu et al., MedIA
2023) on a ``SemanticSegmentor``: one shared encoder, two decoder heads.

- top head (``teacher``): the head's losses (CE [+ Dice]) on fully labeled images;
- bottom head (``student``): partial CE on the annotated pixels of weakly labeled images (scribbles; unannotated
  = ``IGNORE_VALUE``) + ``w(t) * (KL_WEIGHT * KL(top || bottom) + ENTROPY_WEIGHT * H(bottom))`` on the weak
  images, the top detached. Weak images without any label map give the paper's semi-supervised variant
  (KL + entropy only). ``BOTTOM_FULL_LABELS`` also trains the bottom head with CE on the fully labeled images.
Both ``teacher`` and ``student`` are ``SemanticSegmentor``s sharing one backbone module, so either exports as a
plain model (``tools/export_teacher.py --which student``). The paper predicts with the bottom head:
``SEMI.EVAL_WITH student``. There is no EMA: the top head learns by gradient (``EMA_TEACHER = False``).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_sem_seg_head
from detectron2.utils.events import get_event_storage
from torch import nn

from mmt_psm.core.teacher_student import TeacherStudentMixin, ramp_config
from mmt_psm.networks.segmentor import build_semantic_segmentor, images_of, targets_of
from mmt_psm.networks.unet import supervised_ce
from mmt_psm.semantic.common import image_mask
from mmt_psm.semantic.losses import entropy_map, kl_map, masked_mean, split_by_flag

__all__ = ["MixedSupervisionSegmentor"]


@META_ARCH_REGISTRY.register()
class MixedSupervisionSegmentor(TeacherStudentMixin, nn.Module):
    """Shared encoder, top head on full labels, bottom head on weak labels + KL(top || bottom) + entropy."""

    EMA_TEACHER = False

    @configurable
    def __init__(
        self, *, teacher: nn.Module, bottom_head: nn.Module, burn_in: int, ramp_up: int, ramp_down: int,
        max_iter: int, unsup_weight_base: float, kl_weight: float, entropy_weight: float,
        bottom_full_labels: bool, eval_with: str = "student",
    ):
        super().__init__()
        self.teacher = teacher
        # a second segmentor of the same class around the SAME backbone module
        self.student = type(teacher)(backbone=teacher.backbone, sem_seg_head=bottom_head,
                                     pixel_mean=teacher.pixel_mean.flatten().tolist(),
                                     pixel_std=teacher.pixel_std.flatten().tolist())
        self.burn_in, self.ramp_up, self.ramp_down, self.max_iter = burn_in, ramp_up, ramp_down, max_iter
        self.unsup_weight_base = unsup_weight_base
        self.kl_weight, self.entropy_weight, self.bottom_full_labels = kl_weight, entropy_weight, bottom_full_labels
        self._init_teacher_student(eval_with)

    @classmethod
    def from_config(cls, cfg) -> dict:
        m = cfg.MODEL.MIXED_SUP
        teacher = build_semantic_segmentor(cfg, m.STUDENT_ARCHITECTURE)
        return {
            **ramp_config(cfg),
            "teacher": teacher,
            "bottom_head": build_sem_seg_head(cfg, teacher.backbone.output_shape()),
            "kl_weight": m.KL_WEIGHT, "entropy_weight": m.ENTROPY_WEIGHT, "bottom_full_labels": m.BOTTOM_FULL_LABELS,
        }

    @property
    def device(self) -> torch.device:
        return self.teacher.device

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference_model()(batched_inputs)
        labeled, weak = split_by_flag(batched_inputs)
        if not labeled:
            raise ValueError("MixedSupervisionSegmentor needs fully labeled images in every batch "
                             "(SEMI.IMS_PER_BATCH_LABELED)")
        storage = get_event_storage()
        images = images_of(self.teacher, labeled + weak)
        features = self.teacher.backbone(images.tensor)
        _, top = self.teacher.sem_seg_head.decode(features)
        _, bottom = self.student.sem_seg_head.decode(features)
        n = len(labeled)
        shape = tuple(images.tensor.shape[-2:])
        full = targets_of(self.teacher, labeled, shape)
        losses = {f"{k}_top": v for k, v in self.teacher.sem_seg_head.losses(top[:n], full).items()}
        ignore = self.student.sem_seg_head.ignore_value
        if self.bottom_full_labels:
            extra = self.student.sem_seg_head.losses(bottom[:n], full)
            losses.update({f"{k}_bottom_full": v for k, v in extra.items()})
        zero = bottom.sum() * 0.0
        partial, kl, ent = zero, zero, zero
        weak_targets = None
        if weak:
            weak_targets = targets_of(self.student, weak, shape)
            if weak_targets is not None:
                partial = supervised_ce(bottom[n:], weak_targets, ignore)
            inside = image_mask(images)[n:]
            kl = masked_mean(kl_map(top[n:], bottom[n:]), inside)
            ent = masked_mean(entropy_map(bottom[n:]), inside)
        weight = self.loss_weight(storage.iter)
        storage.put_scalar("mixed/unsup_weight", weight, smoothing_hint=False)
        annotated = (weak_targets != ignore).float().mean() if weak and weak_targets is not None else zero
        kl_raw, ent_raw, frac = torch.stack([kl.detach(), ent.detach(), annotated.detach()]).tolist()  # one sync
        storage.put_scalars(**{"mixed/loss_kl_raw": kl_raw, "mixed/loss_entropy_raw": ent_raw})
        if weak and weak_targets is not None:
            storage.put_scalar("mixed/annotated_fraction", frac)
        losses["loss_partial_ce"] = partial
        losses["loss_kl"] = kl * (weight * self.kl_weight)
        losses["loss_entropy"] = ent * (weight * self.entropy_weight)
        return losses
