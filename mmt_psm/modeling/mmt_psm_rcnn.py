"""MMT-PSM (Zhou et al., MICCAI 2020) as a Detectron2 meta-architecture around a Mask R-CNN student.

The module owns the ``student`` (a normal ``GeneralizedRCNN``), the ``teacher`` (its EMA copy, always in eval
mode, no gradients) and the 1x1 feature adaptors of both. Training batches mix labeled dicts (supervised
Mask R-CNN losses on the student) and unlabeled dicts carrying teacher/student views (``MMTPSMViewMapper``).
After burn-in, unlabeled images add ``w(t) * (PSM_WEIGHT * loss_psm + MGD_WEIGHT * loss_mgd)``. At test time it
runs the teacher (or the student: ``evaluate_with``). Switches give the baselines from the same code:
supervised only (no unlabeled batch), plain Mean Teacher (MINING off, MGD_USE_MASK off, NUM_TEACHER_COPIES 1,
TEACHER_FLIP off), each component alone (PSM_LOSS / MGD_LOSS).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage
from torch import nn

from .distill_losses import FeatureAdaptors, mask_guided_feature_loss, psm_distillation_loss
from .pseudo_labels import foreground_map, label_and_sample, pseudo_targets, training_topk
from .sensitivity import mine_negatives, proposal_sensitivity
from .teacher_student import TeacherStudentMixin, ramp_config
from .views import flip_feature_map, level_width

__all__ = ["MMTPSMRCNN"]


@META_ARCH_REGISTRY.register()
class MMTPSMRCNN(TeacherStudentMixin, nn.Module):
    """Mask-guided Mean Teacher with Perturbation-sensitive Sample Mining on Mask R-CNN."""

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        num_classes: int,
        mgd_features: Tuple[str, ...],
        adaptor_dim: int,
        burn_in: int,
        ramp_up: int,
        ramp_down: int,
        max_iter: int,
        unsup_weight_base: float,
        psm_loss: bool,
        psm_weight: float,
        sharpen_t: float,
        mining: bool,
        negative_ratio: float,
        negative_weight: float,
        mgd_loss: bool,
        mgd_weight: float,
        mgd_use_mask: bool,
        mask_threshold: float,
        pseudo_score_thresh: float,
        proposal_batch_size: int,
        proposal_positive_fraction: float,
        proposal_iou: float,
        student_box_dropout: float,
        eval_with: str = "teacher",
    ):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student)
        if student_box_dropout > 0:  # after fc7 of the student only (appended to the Sequential box head)
            self.student.roi_heads.box_head.add_module("student_dropout", nn.Dropout(student_box_dropout))
        channels = {k: v.channels for k, v in student.backbone.output_shape().items()}
        self.strides = {k: v.stride for k, v in student.backbone.output_shape().items()}
        in_ch = {channels[f] for f in mgd_features}
        if len(in_ch) != 1:
            raise ValueError(f"MGD_IN_FEATURES {mgd_features} must share one channel count, got {in_ch}")
        self.adaptors_student = FeatureAdaptors(mgd_features, in_ch.pop(), adaptor_dim)
        self.adaptors_teacher = copy.deepcopy(self.adaptors_student)
        for p in self.adaptors_teacher.parameters():
            p.requires_grad_(False)
        self.num_classes, self.mgd_features = num_classes, tuple(mgd_features)
        self.burn_in, self.ramp_up, self.ramp_down, self.max_iter = burn_in, ramp_up, ramp_down, max_iter
        self.unsup_weight_base = unsup_weight_base
        self.psm_loss, self.psm_weight, self.sharpen_t = psm_loss, psm_weight, sharpen_t
        self.mining, self.negative_ratio, self.negative_weight = mining, negative_ratio, negative_weight
        self.mgd_loss, self.mgd_weight, self.mgd_use_mask = mgd_loss, mgd_weight, mgd_use_mask
        self.mask_threshold, self.pseudo_score_thresh = mask_threshold, pseudo_score_thresh
        self.proposal_batch_size, self.proposal_positive_fraction = proposal_batch_size, proposal_positive_fraction
        self.proposal_iou = proposal_iou
        # set by PseudoLabelVisHook for the steps it draws: keep (unlabeled dicts, detections) in _last_pseudo
        self.record_pseudo_labels = False
        self._last_pseudo = None
        self.adaptors_teacher.eval()
        # the shared core: frozen eval-mode teacher, evaluate_with, loss_weight, plain-detector loading
        self._init_teacher_student(eval_with)

    @classmethod
    def from_config(cls, cfg):
        student_cfg = cfg.clone()
        student_cfg.defrost()
        student_cfg.MODEL.META_ARCHITECTURE = cfg.MODEL.MMT_PSM.STUDENT_ARCHITECTURE
        m = cfg.MODEL.MMT_PSM
        n_views = m.NUM_TEACHER_COPIES * (2 if m.TEACHER_FLIP else 1)
        if m.MINING and n_views < 2:
            raise ValueError(
                f"MODEL.MMT_PSM.MINING needs >= 2 teacher views to measure perturbation sensitivity, got "
                f"NUM_TEACHER_COPIES={m.NUM_TEACHER_COPIES}, TEACHER_FLIP={m.TEACHER_FLIP}: set MINING False "
                "(plain Mean Teacher) or add views"
            )
        return {
            "student": build_model(student_cfg),
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "mgd_features": tuple(m.MGD_IN_FEATURES),
            "adaptor_dim": m.MGD_ADAPTOR_DIM,
            **ramp_config(cfg),
            "psm_loss": m.PSM_LOSS,
            "psm_weight": m.PSM_WEIGHT,
            "sharpen_t": m.SHARPEN_T,
            "mining": m.MINING,
            "negative_ratio": m.NEGATIVE_RATIO,
            "negative_weight": m.NEGATIVE_WEIGHT,
            "mgd_loss": m.MGD_LOSS,
            "mgd_weight": m.MGD_WEIGHT,
            "mgd_use_mask": m.MGD_USE_MASK,
            "mask_threshold": m.MASK_THRESHOLD,
            "pseudo_score_thresh": m.PSEUDO_SCORE_THRESH,
            "proposal_batch_size": m.PROPOSAL_BATCH_SIZE,
            "proposal_positive_fraction": m.PROPOSAL_POSITIVE_FRACTION,
            "proposal_iou": m.PROPOSAL_IOU,
            "student_box_dropout": m.STUDENT_BOX_DROPOUT,
        }

    # ------------------------------------------------------------------ teacher-student interface
    @property
    def device(self) -> torch.device:
        return self.student.device

    def teacher_student_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """The (EMA target, source) module pairs the EMA hook updates."""
        return [(self.teacher, self.student), (self.adaptors_teacher, self.adaptors_student)]

    def train(self, mode: bool = True) -> MMTPSMRCNN:
        super().train(mode)  # TeacherStudentMixin: the teacher stays in eval mode
        self.adaptors_teacher.eval()
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference_model()(batched_inputs)
        labeled = [d for d in batched_inputs if d.get("labeled", True)]
        unlabeled = [d for d in batched_inputs if not d.get("labeled", True)]
        losses = self.student(labeled) if labeled else {}
        storage = get_event_storage()
        weight = self.loss_weight(storage.iter)
        storage.put_scalar("mmt_psm/unsup_weight", weight, smoothing_hint=False)
        if unlabeled and storage.iter >= self.burn_in and (self.psm_loss or self.mgd_loss):
            unsup = self.unsupervised_losses(unlabeled)
        else:  # touch the adaptors so DDP sees the same parameters used on every rank and iteration
            zero = sum(p.sum() for p in self.adaptors_student.parameters()) * 0.0
            unsup = {"loss_psm": zero, "loss_mgd": zero}
        losses["loss_psm"] = unsup["loss_psm"] * (weight * self.psm_weight)
        losses["loss_mgd"] = unsup["loss_mgd"] * (weight * self.mgd_weight)
        return losses

    def _images(self, tensors: List[torch.Tensor]) -> ImageList:
        """Normalise and pad like GeneralizedRCNN.preprocess_image (uint8 CHW tensors)."""
        s = self.student
        return ImageList.from_tensors(
            [(t.to(self.device) - s.pixel_mean) / s.pixel_std for t in tensors], s.backbone.size_divisibility
        )

    def _box_logits(self, model: nn.Module, features: Dict[str, torch.Tensor], boxes) -> torch.Tensor:
        heads = model.roi_heads
        x = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
        return heads.box_predictor(heads.box_head(x))[0]

    def _flip_back(self, feats: Dict[str, torch.Tensor], widths: List[int]) -> Dict[str, torch.Tensor]:
        return {
            k: flip_feature_map(v, [level_width(w, self.strides[k]) for w in widths]) for k, v in feats.items()
        }

    def unsupervised_losses(self, unlabeled: List[Dict]) -> Dict[str, torch.Tensor]:
        """loss_psm and loss_mgd (unweighted) on a batch of unlabeled view dicts."""
        storage = get_event_storage()
        n_views = len(unlabeled[0]["teacher_views"])
        if self.mining and n_views < 2:
            raise ValueError(
                f"MINING needs >= 2 teacher views to measure perturbation sensitivity, the batch has {n_views}"
            )
        if any(d["student_transform"].hflip for d in unlabeled if "student_transform" in d):
            raise ValueError(
                "a flipped student view is not supported: proposals and the foreground map are in the teacher "
                "view 0 frame; build unlabeled views with student_flip=False"
            )
        with torch.no_grad():
            # (2) pseudo-labels and foreground map from teacher view 0; (3) training-mode proposals
            t_images = [self._images([d["teacher_views"][v] for d in unlabeled]) for v in range(n_views)]
            t_feats0 = self.teacher.backbone(t_images[0].tensor)
            with training_topk(self.teacher.proposal_generator):
                proposals, _ = self.teacher.proposal_generator(t_images[0], t_feats0)
            detections, _ = self.teacher.roi_heads(t_images[0], t_feats0, proposals)
            detections = [d[d.scores >= self.pseudo_score_thresh] for d in detections]
            fg = foreground_map(detections, t_images[0], self.mask_threshold)
            boxes, labels = label_and_sample(
                proposals, pseudo_targets(detections), self.num_classes, self.proposal_iou,
                self.proposal_batch_size, self.proposal_positive_fraction,
            )
            widths = [w for _, w in t_images[0].image_sizes]
            view_logits, t_adapted = [], []
            for v in range(n_views):
                feats = t_feats0 if v == 0 else self.teacher.backbone(t_images[v].tensor)
                flipped = [d["teacher_transforms"][v].hflip for d in unlabeled]
                if len(set(flipped)) != 1:
                    raise ValueError("teacher view v must be flipped in all images of a batch or in none")
                v_boxes = boxes
                if flipped[0]:
                    v_boxes = [d["teacher_transforms"][v].apply_boxes(b) for d, b in zip(unlabeled, boxes)]
                view_logits.append(self._box_logits(self.teacher, feats, v_boxes))
                if self.mgd_loss:
                    adapted = self.adaptors_teacher({f: feats[f] for f in self.mgd_features})
                    t_adapted.append(self._flip_back(adapted, widths) if flipped[0] else adapted)
            mean_logits, sensitivity = proposal_sensitivity(torch.stack(view_logits))
            labels = torch.cat(labels)
            is_pos = labels != self.num_classes
            if self.mining:
                keep, weights = mine_negatives(is_pos, sensitivity, self.negative_ratio, self.negative_weight)
            else:  # plain mean teacher: every sampled proposal, weight 1
                weights = torch.ones_like(sensitivity)
                keep = weights > 0

        s_images = self._images([d["student_view"] for d in unlabeled])
        s_feats = self.student.backbone(s_images.tensor)
        # a zero that touches the adaptors keeps DDP's set of used parameters the same whatever is switched off
        zero = sum(p.sum() for p in self.adaptors_student.parameters()) * 0.0
        out = {"loss_psm": zero, "loss_mgd": zero}
        if self.psm_loss:
            s_logits = self._box_logits(self.student, s_feats, boxes)
            out["loss_psm"] = psm_distillation_loss(s_logits, mean_logits, weights, self.sharpen_t) + zero
        if self.mgd_loss:
            s_adapted = self.adaptors_student({f: s_feats[f] for f in self.mgd_features})
            out["loss_mgd"] = torch.stack(
                [mask_guided_feature_loss(s_adapted, t, fg, use_mask=self.mgd_use_mask) for t in t_adapted]
            ).mean()
        n_img = len(unlabeled)
        # one device->host copy for all logged statistics
        positives, mined, fg_fraction, psm_raw, mgd_raw = torch.stack(
            [is_pos.sum().float(), (keep & ~is_pos).sum().float(), fg.mean().float(),
             out["loss_psm"].detach().float(), out["loss_mgd"].detach().float()]
        ).tolist()
        # unweighted losses, beside the weighted loss_psm / loss_mgd that Detectron2 logs
        storage.put_scalar("mmt_psm/loss_psm_raw", psm_raw)
        storage.put_scalar("mmt_psm/loss_mgd_raw", mgd_raw)
        storage.put_scalar("mmt_psm/pseudo_labels_per_image", sum(len(d) for d in detections) / n_img)
        storage.put_scalar("mmt_psm/positives_per_image", positives / n_img)
        storage.put_scalar("mmt_psm/mined_negatives_per_image", mined / n_img)
        storage.put_scalar("mmt_psm/fg_fraction", fg_fraction)
        if self.record_pseudo_labels:
            self._last_pseudo = (unlabeled, detections)
        return out
