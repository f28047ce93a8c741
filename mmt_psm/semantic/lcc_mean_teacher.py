"""Low-confidence consistency + class separation mean teacher (Gao & Yu, ISBP 2023) on a ``SemanticSegmentor``.

Per step (labeled and unlabeled images in one student forward, as SSL4MIS does):
- supervised: the head's own losses (CE [+ Dice]) on labeled images;
- the EMA teacher sees the unlabeled images + clipped Gaussian noise; confidence = its max softmax;
  pixels with confidence < ``TAU`` are the low-confidence set;
- ``loss_consistency = w(t) * mean over low-confidence pixels of mean_c (p_student - p_teacher)^2``;
- class prototypes = EMA (``PROTO_MOMENTUM``) of masked means of the student's decoder features on labeled
  pixels of each class (summed over DDP ranks first, so every rank keeps the same prototypes);
- ``loss_separation = w(t) * SEPARATION_WEIGHT * CE(cos(f, P) / T, teacher argmax)`` on the low-confidence pixels.
Beyond the paper (off by default): ``PROJECTION_DIM > 0`` computes prototypes and separation on a projection of
the decoder features, ``SEPARATION_START_ITER`` delays the separation term, ``BN_STATS labeled`` keeps
BatchNorm's running statistics (the test-time ones) from the labeled images only (two student forwards).
``LOW_CONF_ONLY False`` + ``SEPARATION False`` is SSL4MIS's plain Mean Teacher from the same code.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch
import torch.distributed as dist
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from mmt_psm.core.teacher_student import TeacherStudentMixin, ramp_config
from mmt_psm.networks.segmentor import build_semantic_segmentor, images_of, segment, targets_of
from mmt_psm.semantic.common import image_mask, segment_split
from mmt_psm.semantic.losses import (
    class_feature_means,
    class_separation_loss,
    low_confidence_mask,
    masked_softmax_mse,
    split_by_flag,
    update_prototypes,
)

__all__ = ["LCCMeanTeacherSegmentor"]


@META_ARCH_REGISTRY.register()
class LCCMeanTeacherSegmentor(TeacherStudentMixin, nn.Module):
    """Mean teacher for semantic segmentation with low-confidence consistency and class separation."""

    @configurable
    def __init__(
        self, *, student: nn.Module, num_classes: int, burn_in: int, ramp_up: int, ramp_down: int, max_iter: int,
        unsup_weight_base: float, tau: float, low_conf_only: bool, separation: bool, separation_weight: float,
        temperature: float, proto_momentum: float, noise_std: float, noise_clip: float, eval_with: str = "teacher",
        projection_dim: int = 0, separation_start: int = 0, bn_stats: str = "joint", loss_norm: str = "kept",
    ):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student)
        self.num_classes = num_classes
        self.burn_in, self.ramp_up, self.ramp_down, self.max_iter = burn_in, ramp_up, ramp_down, max_iter
        self.unsup_weight_base = unsup_weight_base
        self.tau, self.low_conf_only = tau, low_conf_only
        self.separation, self.separation_weight, self.temperature = separation, separation_weight, temperature
        self.proto_momentum, self.noise = proto_momentum, (noise_std, noise_clip)
        dim = student.sem_seg_head.feature_channels
        self.separation_start = separation_start
        if bn_stats not in ("joint", "labeled"):
            raise ValueError(f"MODEL.LCC.BN_STATS must be 'joint' or 'labeled', got {bn_stats!r}")
        self.bn_stats = bn_stats
        if loss_norm not in ("kept", "all"):
            raise ValueError(f"MODEL.LCC.LOSS_NORM must be 'kept' or 'all', got {loss_norm!r}")
        self.loss_norm = loss_norm
        # training-only projection for the separation space (a sibling of student/teacher, so export is unchanged)
        self.projector = None  # built only when the separation term would use it
        if separation and projection_dim > 0:
            self.projector = nn.Sequential(
                nn.Conv2d(dim, dim, 1), nn.ReLU(inplace=True), nn.Conv2d(dim, projection_dim, 1))
            dim = projection_dim
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        self.register_buffer("prototypes_initialized", torch.zeros(num_classes, dtype=torch.bool))
        self._init_teacher_student(eval_with)

    @classmethod
    def from_config(cls, cfg) -> dict:
        m = cfg.MODEL.LCC
        return {
            **ramp_config(cfg),
            "student": build_semantic_segmentor(cfg, m.STUDENT_ARCHITECTURE),
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "tau": m.TAU, "low_conf_only": m.LOW_CONF_ONLY, "separation": m.SEPARATION,
            "separation_weight": m.SEPARATION_WEIGHT, "temperature": m.TEMPERATURE,
            "proto_momentum": m.PROTO_MOMENTUM, "noise_std": m.TEACHER_NOISE, "noise_clip": m.NOISE_CLIP,
            "projection_dim": m.PROJECTION_DIM, "separation_start": m.SEPARATION_START_ITER,
            "bn_stats": m.BN_STATS, "loss_norm": m.LOSS_NORM,
        }

    @property
    def device(self) -> torch.device:
        return self.student.device

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference_model()(batched_inputs)
        labeled, unlabeled = split_by_flag(batched_inputs)
        if not labeled:
            raise ValueError("LCCMeanTeacherSegmentor needs labeled images in every batch (SEMI.IMS_PER_BATCH_LABELED)")
        storage = get_event_storage()
        images = images_of(self.student, labeled + unlabeled)
        n_lab = len(labeled)
        feats, logits = segment_split(self.student, images, n_lab, self.bn_stats)
        targets = targets_of(self.student, labeled, tuple(images.tensor.shape[-2:]))
        losses = self.student.sem_seg_head.losses(logits[:n_lab], targets)
        if self.projector is not None:
            feats = self.projector(feats)
        self._update_prototypes(feats[:n_lab], targets)
        weight = self.loss_weight(storage.iter)
        storage.put_scalar("lcc/unsup_weight", weight, smoothing_hint=False)
        zero = (logits.sum() + feats.sum()) * 0.0  # graph-connected: DDP sees every parameter used
        raw_cons, raw_sep, frac = zero, zero, zero.detach()
        unsupervised_step = bool(unlabeled) and storage.iter >= self.burn_in
        if unsupervised_step:
            raw_cons, raw_sep, frac = self._unsupervised(unlabeled, feats[n_lab:], logits[n_lab:], images, n_lab,
                                                         separate=storage.iter >= self.separation_start)
        losses["loss_consistency"] = raw_cons * weight
        losses["loss_separation"] = raw_sep * (weight * self.separation_weight)
        # one device->host copy for every logged statistic of the step
        stats = torch.cat([torch.stack([raw_cons.detach(), raw_sep.detach(), frac]),
                           self.prototypes.norm(dim=1)]).tolist()
        storage.put_scalars(**{"lcc/loss_consistency_raw": stats[0], "lcc/loss_separation_raw": stats[1]})
        if unsupervised_step:
            storage.put_scalar("lcc/low_conf_fraction", stats[2])
        storage.put_scalars(**{f"lcc/prototype_norm_{c}": v for c, v in enumerate(stats[3:])})
        return losses

    def _unsupervised(self, unlabeled, feats_u, logits_u, images, n_lab, separate: bool = True):
        with torch.no_grad():
            t_images = images_of(self.teacher, unlabeled, noise=self.noise)
            _, t_logits = segment(self.teacher, t_images)
            t_probs = t_logits.softmax(dim=1)
        inside = image_mask(images)[n_lab:]
        low, pseudo = low_confidence_mask(t_probs, self.tau)
        kept = (low if self.low_conf_only else torch.ones_like(low)) & inside
        frac = kept.sum().float() / inside.sum().clamp(min=1).float()
        over = inside if self.loss_norm == "all" else None  # "all": a kept pixel weighs what it does in MT
        cons = masked_softmax_mse(logits_u.softmax(dim=1), t_probs, kept, over)
        sep = (logits_u.sum() + feats_u.sum()) * 0.0  # graph-connected zero (projector included)
        if self.separation and separate:
            sep = class_separation_loss(feats_u, pseudo, kept, self.prototypes, self.temperature,
                                        self.prototypes_initialized, over)
        return cons, sep, frac

    @torch.no_grad()
    def _update_prototypes(self, feats: torch.Tensor, targets: torch.Tensor) -> None:
        if not self.separation:
            return
        sums, counts = class_feature_means(feats, targets, self.num_classes, self.student.sem_seg_head.ignore_value)
        if comm.get_world_size() > 1:  # one set of prototypes on every rank
            packed = torch.cat([sums, counts.unsqueeze(1).to(sums.dtype)], dim=1)
            dist.all_reduce(packed)
            sums, counts = packed[:, :-1], packed[:, -1]
        update_prototypes(self.prototypes, self.prototypes_initialized, sums, counts, self.proto_momentum)
