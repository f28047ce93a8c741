"""MMT-PSM (Zhou et al., MICCAI 2020) as a Detectron2 meta-architecture around a Mask R-CNN student.

The module owns the ``student`` (a normal ``GeneralizedRCNN``), the ``teacher`` (its EMA copy, always in eval
mode, no gradients) and the 1x1 feature adaptors of both. Training batches mix labeled dicts (supervised
Mask R-CNN losses on the student) and unlabeled dicts carrying teacher/student views (``MMTPSMViewMapper``).
After burn-in, unlabeled images add ``w(t) * (PSM_WEIGHT * loss_psm + MGD_WEIGHT * loss_mgd)``. At test time it
runs the teacher (or the student: ``evaluate_with``). Switches give the baselines from the same code:
supervised only (no unlabeled batch), plain Mean Teacher (MINING off, MGD_USE_MASK off, NUM_TEACHER_COPIES 1,
TEACHER_FLIP off), each component alone (PSM_LOSS / MGD_LOSS).

The teacher is in eval mode, so its passes are batched over its views: the 2K views of a batch of B images go
through its backbone as one batch of 2K*B images (view-major: sample ``v * B + i`` is view v of image i; the views
of one image have one size, so each is padded exactly as in a batch of that view alone), its box branch and mask
head run once on the boxes of all views that need them, and the flipped views' features are flipped back in one
gather. ``part_timer`` (None, or a callable ``name -> context manager``) is entered around the parts of a step
(``sup_forward``, ``teacher_other`` and inside it ``teacher_backbones``, ``teacher_rpn``, ``teacher_detect``,
``teacher_mask_head``, ``teacher_fg_map``, ``teacher_box_heads``, ``teacher_distill_masks``; then
``student_unsup``), the hook ``tools/benchmark.py --profile`` times them with. ``TEACHER_VIEWS_PER_PASS`` 1 runs
the teacher one view at a time instead (the same losses; on a CPU no slower and a lower peak).
"""
from __future__ import annotations

import copy
import itertools
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage
from torch import nn

from mmt_psm.core.teacher_student import TeacherStudentMixin, ramp_config
from mmt_psm.instance.distillation import FeatureAdaptors, mask_guided_feature_loss, mined_semantic_distillation_loss
from mmt_psm.instance.pseudo_labels import (
    foreground_map,
    label_and_sample,
    pseudo_targets,
    training_topk,
)
from mmt_psm.instance.sensitivity_mining import mine_negatives, proposal_sensitivity
from mmt_psm.instance.teacher_views import TeacherViewsMixin, _runs, _split, _ViewBoxes, _views
from mmt_psm.instance.view_ensemble import (
    mask_distillation_loss,
    subsample_positives,
    teacher_view_masks,
)
from mmt_psm.instance.views import flip_feature_map, level_width

__all__ = ["MMTPSMRCNN"]


@META_ARCH_REGISTRY.register()
class MMTPSMRCNN(TeacherViewsMixin, TeacherStudentMixin, nn.Module):
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
        fg_map_mode: str = "union",
        fuse_all_views: bool = False,
        fuse_iou: float = 0.55,
        mask_distill: bool = False,
        mask_distill_weight: float = 1.0,
        mask_distill_max_positives: int = 0,
        eval_with: str = "teacher",
        views_per_pass: int = 0,
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
        thresholds = tuple(pseudo_score_thresh) if isinstance(pseudo_score_thresh, (tuple, list)) else (
            float(pseudo_score_thresh),)
        if len(thresholds) not in (1, num_classes):
            raise ValueError(f"{len(thresholds)} pseudo-label score thresholds for {num_classes} classes")
        self.mask_threshold, self.pseudo_score_thresh = mask_threshold, thresholds
        self.fg_map_mode, self.fuse_all_views, self.fuse_iou = fg_map_mode, fuse_all_views, fuse_iou
        self.mask_distill, self.mask_distill_weight = mask_distill, mask_distill_weight
        if mask_distill_max_positives < 0:
            raise ValueError(f"MASK_DISTILL_MAX_POSITIVES must be >= 0 (0 = all), got {mask_distill_max_positives}")
        self.mask_distill_max_positives = mask_distill_max_positives
        if mask_distill and not getattr(student.roi_heads, "mask_on", False):
            raise ValueError("MODEL.MMT_PSM.MASK_DISTILL needs a student with a mask head (MODEL.MASK_ON True)")
        self.proposal_batch_size, self.proposal_positive_fraction = proposal_batch_size, proposal_positive_fraction
        self.proposal_iou = proposal_iou
        # set by PseudoLabelVisHook for the steps it draws: keep (unlabeled dicts, detections) in _last_pseudo
        self.record_pseudo_labels = False
        self._last_pseudo = None
        # the public profiling hook (module docstring): None, or name -> context manager entered around each part
        self.part_timer: Optional[Callable[[str], ContextManager]] = None
        # teacher views per backbone / box-head / mask-head pass (TEACHER_VIEWS_PER_PASS): 0 = all views in one
        # pass; 1 = one pass per view (the per-view loop, also the reference of tests/instance/test_batched_teacher.py)
        if views_per_pass < 0:
            raise ValueError(f"TEACHER_VIEWS_PER_PASS must be >= 0 (0 = all views), got {views_per_pass}")
        self.views_per_pass = views_per_pass
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
            "pseudo_score_thresh": tuple(m.PSEUDO_SCORE_THRESH_PER_CLASS) or m.PSEUDO_SCORE_THRESH,
            "proposal_batch_size": m.PROPOSAL_BATCH_SIZE,
            "proposal_positive_fraction": m.PROPOSAL_POSITIVE_FRACTION,
            "proposal_iou": m.PROPOSAL_IOU,
            "student_box_dropout": m.STUDENT_BOX_DROPOUT,
            "fg_map_mode": m.FG_MAP,
            "fuse_all_views": m.FUSE_ALL_VIEWS,
            "fuse_iou": m.FUSE_IOU,
            "mask_distill": m.MASK_DISTILL,
            "mask_distill_weight": m.MASK_DISTILL_WEIGHT,
            "mask_distill_max_positives": m.MASK_DISTILL_MAX_POSITIVES,
            "views_per_pass": m.TEACHER_VIEWS_PER_PASS,
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
        with self._part("sup_forward"):
            losses = self.student(labeled) if labeled else {}
        storage = get_event_storage()
        weight = self.loss_weight(storage.iter)
        storage.put_scalar("mmt_psm/unsup_weight", weight, smoothing_hint=False)
        if unlabeled and storage.iter >= self.burn_in and (self.psm_loss or self.mgd_loss or self.mask_distill):
            unsup = self.unsupervised_losses(unlabeled)
        else:  # touch the adaptors so DDP sees the same parameters used on every rank and iteration
            zero = sum(p.sum() for p in self.adaptors_student.parameters()) * 0.0
            unsup = {"loss_psm": zero, "loss_mgd": zero}
        losses["loss_psm"] = unsup["loss_psm"] * (weight * self.psm_weight)
        losses["loss_mgd"] = unsup["loss_mgd"] * (weight * self.mgd_weight)
        if self.mask_distill:
            if "loss_mask_distill" not in unsup:  # burn-in: touch the student's mask head for DDP
                unsup["loss_mask_distill"] = sum(p.sum() for p in self.student.roi_heads.mask_head.parameters()) * 0.0
            losses["loss_mask_distill"] = unsup["loss_mask_distill"] * (weight * self.mask_distill_weight)
        return losses

    def unsupervised_losses(self, unlabeled: List[Dict]) -> Dict[str, torch.Tensor]:
        """loss_psm, loss_mgd (and loss_mask_distill when switched on), unweighted, on unlabeled view dicts."""
        storage = get_event_storage()
        n_views, n_img = len(unlabeled[0]["teacher_views"]), len(unlabeled)
        if self.mining and n_views < 2:
            raise ValueError(
                f"MINING needs >= 2 teacher views to measure perturbation sensitivity, the batch has {n_views}"
            )
        if any(d["student_transform"].hflip for d in unlabeled if "student_transform" in d):
            raise ValueError(
                "a flipped student view is not supported: proposals and the foreground map are in the teacher "
                "view 0 frame; build unlabeled views with student_flip=False"
            )
        flipped = []
        for v in range(n_views):
            f = {d["teacher_transforms"][v].hflip for d in unlabeled}
            if len(f) != 1:
                raise ValueError("teacher view v must be flipped in all images of a batch or in none")
            flipped.append(f.pop())
        with torch.no_grad(), self._part("teacher_other"):
            # (2) pseudo-labels and foreground map; (3) training-mode proposals from teacher view 0. Every view in
            # one batch (view-major), one backbone pass
            t_images = self._teacher_images(unlabeled, n_views)
            with self._part("teacher_backbones"):
                t_feats = self._teacher_features(t_images, n_views)
            images0 = ImageList(t_images.tensor[:n_img], t_images.image_sizes[:n_img])
            with self._part("teacher_rpn"), training_topk(self.teacher.proposal_generator):
                proposals, _ = self.teacher.proposal_generator(images0, _views(t_feats, 0, 1, n_img))
            # the pseudo-labels' masks feed only the foreground map of loss_mgd and the recorded pseudo-labels
            # (monitor, visualisation): without either the teacher's mask head is skipped, losses unchanged
            with_masks = self.mgd_loss or self.record_pseudo_labels
            detections, all_logits = self._teacher_detections(t_images, t_feats, proposals, flipped, with_masks)
            fg = None
            if with_masks:
                with self._part("teacher_fg_map"):
                    fg = foreground_map(detections, images0, self.mask_threshold, self.fg_map_mode)
            boxes, labels, kept, num_pos = label_and_sample(
                proposals, pseudo_targets(detections), self.num_classes, self.proposal_iou,
                self.proposal_batch_size, self.proposal_positive_fraction, return_indices=True,
                return_num_positives=True,
            )
            # the sampled proposals' rows in the proposals' concatenation (where a view's logits are reused);
            # offsets from the host-side proposal counts
            offsets = itertools.accumulate([0] + [len(p) for p in proposals[:-1]])
            sampled_rows = torch.cat([k + o for k, o in zip(kept, offsets)])
            widths = [w for _, w in images0.image_sizes]
            in_view = _ViewBoxes(unlabeled, flipped)

            # (4) the sampled proposals' class logits on every view: reused rows of a detection pass, the other
            # views' in one box-branch pass
            view_logits: List[Optional[torch.Tensor]] = [
                None if lg is None else lg[sampled_rows] for lg in all_logits]
            need = [v for v, lg in enumerate(view_logits) if lg is None]
            with self._part("teacher_box_heads"):
                for a, z in (r for run in _runs(need) for r in self._view_passes(*run)):
                    logits = self._box_logits(self.teacher, _views(t_feats, a, z, n_img), in_view(boxes, a, z))
                    view_logits[a:z] = _split(logits, z - a)
            mean_logits, sensitivity = proposal_sensitivity(torch.stack(view_logits))
            mask_targets = pos_boxes = pos_labels = None
            if self.mask_distill:
                # each image's sample lists its positives first: slice them by the host-side counts
                pos_boxes = [bx[:n] for bx, n in zip(boxes, num_pos)]
                pos_labels = [lab[:n] for lab, n in zip(labels, num_pos)]
                if self.mask_distill_max_positives > 0:  # fewer teacher mask-head inputs
                    pos_boxes, pos_labels = subsample_positives(pos_boxes, pos_labels,
                                                                self.mask_distill_max_positives)
                pos_labels = torch.cat(pos_labels)
                t_masks = []
                with self._part("teacher_distill_masks"):
                    for a, z in self._view_passes(0, n_views):
                        masks = self._mask_logits(self.teacher, _views(t_feats, a, z, n_img), in_view(pos_boxes, a, z))
                        t_masks += _split(masks, z - a)
                mask_targets = teacher_view_masks(t_masks, pos_labels, flipped)
            t_adapted = []
            if self.mgd_loss:  # the adaptors on every view at once; flipped views flipped back in one gather
                adapted = self.adaptors_teacher({f: t_feats[f] for f in self.mgd_features})
                if any(flipped):
                    adapted = {k: flip_feature_map(x, [level_width(w, self.strides[k]) if flipped[v] else 0
                                                       for v in range(n_views) for w in widths])
                               for k, x in adapted.items()}
                t_adapted = [_views(adapted, v, v + 1, n_img) for v in range(n_views)]
            labels = torch.cat(labels)
            is_pos = labels != self.num_classes
            if self.mining:
                keep, weights = mine_negatives(is_pos, sensitivity, self.negative_ratio, self.negative_weight)
            else:  # plain mean teacher: every sampled proposal, weight 1
                weights = torch.ones_like(sensitivity)
                keep = weights > 0

        with self._part("student_unsup"):
            s_images = self._images([d["student_view"] for d in unlabeled])
            s_feats = self.student.backbone(s_images.tensor)
            # a zero that touches the adaptors keeps DDP's set of used parameters the same whatever is switched off
            zero = sum(p.sum() for p in self.adaptors_student.parameters()) * 0.0
            out = {"loss_psm": zero, "loss_mgd": zero}
            if self.psm_loss:
                s_logits = self._box_logits(self.student, s_feats, boxes)
                out["loss_psm"] = mined_semantic_distillation_loss(s_logits, mean_logits, weights,
                                                                   self.sharpen_t) + zero
            if self.mgd_loss:
                s_adapted = self.adaptors_student({f: s_feats[f] for f in self.mgd_features})
                out["loss_mgd"] = torch.stack(
                    [mask_guided_feature_loss(s_adapted, t, fg, use_mask=self.mgd_use_mask) for t in t_adapted]
                ).mean()
            if self.mask_distill:
                s_masks = self._mask_logits(self.student, s_feats, pos_boxes)
                out["loss_mask_distill"] = mask_distillation_loss(s_masks, pos_labels, mask_targets)
            # unweighted losses (beside the weighted ones Detectron2 logs) and pseudo-label counts, in one
            # device->host copy; fg_fraction only when the foreground map was built
            logged = {"loss_psm_raw": out["loss_psm"], "loss_mgd_raw": out["loss_mgd"],
                      "positives_per_image": is_pos.sum() / n_img,
                      "mined_negatives_per_image": (keep & ~is_pos).sum() / n_img}
            if fg is not None:
                logged["fg_fraction"] = fg.clamp(max=1).mean()
            if self.mask_distill:
                logged["loss_mask_distill_raw"] = out["loss_mask_distill"]
            values = torch.stack([v.detach().float() for v in logged.values()]).tolist()
            for name, value in zip(logged, values):
                storage.put_scalar(f"mmt_psm/{name}", value)
            storage.put_scalar("mmt_psm/pseudo_labels_per_image", sum(len(d) for d in detections) / n_img)
        if self.record_pseudo_labels:
            self._last_pseudo = (unlabeled, detections)
        return out
