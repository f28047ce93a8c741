"""The MMT-PSM teacher's passes over its views: one batched pass of the backbone, the box branch and the mask head
over all 2K views of a batch (view-major: sample ``v * B + i`` is view ``v`` of image ``i``;
``MODEL.MMT_PSM.TEACHER_VIEWS_PER_PASS`` views per pass, 0 = all), and the view bookkeeping (slices of a
view-major batch, runs of views, proposals mapped into flipped views). Mixed into :class:`MMTPSMRCNN`."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from mmt_psm.instance.pseudo_labels import (
    filter_by_score,
)
from mmt_psm.instance.view_ensemble import (
    fuse_view_detections,
)

__all__ = ["TeacherViewsMixin"]


class TeacherViewsMixin:
    """The teacher-side passes of :class:`~mmt_psm.instance.mmt_psm_rcnn.MMTPSMRCNN` (needs ``teacher``,
    ``student``, ``part_timer`` and the view settings its ``__init__`` sets)."""

    def _part(self, name: str) -> ContextManager:
        """``part_timer(name)`` when a profiler set one, else a no-op."""
        return self.part_timer(name) if self.part_timer is not None else contextlib.nullcontext()

    def _images(self, tensors: List[torch.Tensor]) -> ImageList:
        """Normalise and pad like GeneralizedRCNN.preprocess_image (uint8 CHW tensors)."""
        s = self.student
        return ImageList.from_tensors(
            [(t.to(self.device) - s.pixel_mean) / s.pixel_std for t in tensors], s.backbone.size_divisibility
        )

    def _teacher_images(self, unlabeled: List[Dict], n_views: int) -> ImageList:
        """Every teacher view of the batch in one ImageList, view-major (sample ``v * B + i`` = view v of image i).
        One host-to-device copy and one normalisation per image (its views stacked). All views of an image have
        its size, so the batch pads each view exactly as a batch of that view alone would."""
        s, per_image = self.student, []
        for d in unlabeled:
            views = d["teacher_views"]
            if len({tuple(t.shape) for t in views}) != 1:
                raise ValueError(f"the teacher views of one image must have one size, got "
                                 f"{sorted({tuple(t.shape) for t in views})}")
            per_image.append((torch.stack(views).to(self.device) - s.pixel_mean) / s.pixel_std)
        return ImageList.from_tensors([x[v] for v in range(n_views) for x in per_image], s.backbone.size_divisibility)

    def _view_passes(self, start: int, stop: int) -> List[Tuple[int, int]]:
        """Views ``[start, stop)`` as ``[a, z)`` ranges of one teacher pass each (all at once by default)."""
        step = max(self.views_per_pass or (stop - start), 1)
        return [(a, min(a + step, stop)) for a in range(start, stop, step)]

    def _teacher_features(self, images: ImageList, n_views: int) -> Dict[str, torch.Tensor]:
        """The teacher backbone on every view (view-major batch), one pass per ``_view_passes`` range."""
        b = len(images) // n_views
        passes = [self.teacher.backbone(images.tensor[a * b:z * b]) for a, z in self._view_passes(0, n_views)]
        return passes[0] if len(passes) == 1 else {k: torch.cat([p[k] for p in passes]) for k in passes[0]}

    def _box_logits(self, model: nn.Module, features: Dict[str, torch.Tensor], boxes) -> torch.Tensor:
        heads = model.roi_heads
        x = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
        return heads.box_predictor(heads.box_head(x))[0]

    def _teacher_roi(self, images: ImageList, feats: Dict, proposals,
                     with_masks: bool) -> Tuple[List[Instances], Optional[torch.Tensor]]:
        """The teacher's post-processed detections and, for a StandardROIHeads, its class logits for every
        proposal (``[sum R_i, C + 1]``), which the sampled proposals' logits are then taken from instead of a
        second box-branch pass. The box branch is the StandardROIHeads' eval ``_forward_box``; without
        ``with_masks`` the mask head is skipped (the same boxes, scores and classes, no mask head on up to
        TEST.DETECTIONS_PER_IMAGE boxes per view). Detectron2's ``_forward_box`` does not return the logits,
        hence its four eval-mode lines here. Images may be several views' (one entry of ``proposals`` each)."""
        heads = self.teacher.roi_heads
        if not isinstance(heads, StandardROIHeads):
            return heads(images, feats, proposals)[0], None
        x = heads.box_pooler([feats[f] for f in heads.box_in_features], [p.proposal_boxes for p in proposals])
        predictions = heads.box_predictor(heads.box_head(x))
        detections, _ = heads.box_predictor.inference(predictions, proposals)
        if with_masks:
            with self._part("teacher_mask_head"):
                detections = heads.forward_with_given_boxes(feats, detections)
        return detections, predictions[0]

    def _teacher_detections(self, t_images: ImageList, t_feats: Dict, proposals, flipped: List[bool],
                            with_masks: bool = True) -> Tuple[List[Instances], List[Optional[torch.Tensor]]]:
        """Pseudo-labels: the teacher's post-processed detections on view 0, or fused over every view
        (FUSE_ALL_VIEWS; each view scores view 0's proposals mapped into it, all views in one box-branch pass),
        then the score thresholds. ``t_images``/``t_feats``: every view, view-major. ``with_masks`` False: boxes
        only (no ``pred_masks``). Also, per view, the ``[sum R_i, C + 1]`` class logits of all proposals where the
        box branch ran on them (else None)."""
        b, n_views = len(proposals), len(flipped)
        n_detect = n_views if self.fuse_all_views else 1
        mirrored = [_flip_proposals(p, w) for p, (_, w) in zip(proposals, t_images.image_sizes[:b])] if any(
            flipped[:n_detect]) else None  # once per image, shared by every flipped view
        detections, all_logits = [], []
        with self._part("teacher_detect"):
            for a, z in self._view_passes(0, n_detect):
                props = [p for v in range(a, z) for p in (mirrored if flipped[v] else proposals)]
                images = ImageList(t_images.tensor[a * b:z * b], t_images.image_sizes[a * b:z * b])
                dets, logits = self._teacher_roi(images, _views(t_feats, a, z, b), props, with_masks)
                detections += dets
                all_logits += [None] * (z - a) if logits is None else _split(logits, z - a)
        if self.fuse_all_views:
            max_dets = self.teacher.roi_heads.box_predictor.test_topk_per_image
            detections = [
                fuse_view_detections(detections[i::b], flipped, self.fuse_iou, max_dets) for i in range(b)
            ]
        return filter_by_score(detections, self.pseudo_score_thresh), all_logits + [None] * (n_views - n_detect)

    def _mask_logits(self, model: nn.Module, features: Dict[str, torch.Tensor], boxes) -> torch.Tensor:
        heads = model.roi_heads
        return heads.mask_head.layers(heads.mask_pooler([features[f] for f in heads.mask_in_features], boxes))


def _views(feats: Dict[str, torch.Tensor], a: int, z: int, b: int) -> Dict[str, torch.Tensor]:
    """Views ``[a, z)`` of a view-major batch of ``b`` images per view (slices, no copy)."""
    return {k: f[a * b:z * b] for k, f in feats.items()}


def _split(x: torch.Tensor, n: int) -> List[torch.Tensor]:
    """The rows of a view-major pass over ``n`` views, per view (views of ``x``; ``n`` equal parts, also of 0 rows)."""
    return list(x.reshape(n, x.shape[0] // n, *x.shape[1:]).unbind(0))


def _runs(views: Sequence[int]) -> List[Tuple[int, int]]:
    """Sorted view indices as ``[a, z)`` runs of consecutive ones."""
    runs: List[Tuple[int, int]] = []
    for v in views:
        if runs and runs[-1][1] == v:
            runs[-1] = (runs[-1][0], v + 1)
        else:
            runs.append((v, v + 1))
    return runs


class _ViewBoxes:
    """View 0's per-image boxes in views ``[a, z)``, view-major (mapped by the view's transform only where the
    view is flipped); each distinct transform of an image is applied once and shared between views."""

    def __init__(self, unlabeled: List[Dict], flipped: Sequence[bool]):
        self.unlabeled, self.flipped = unlabeled, flipped

    def __call__(self, per_image: List[Boxes], a: int, z: int) -> List[Boxes]:
        cache: Dict[tuple, Boxes] = {}
        out = []
        for v in range(a, z):
            if not self.flipped[v]:
                out += per_image
                continue
            for i, (d, bx) in enumerate(zip(self.unlabeled, per_image)):
                t = d["teacher_transforms"][v]
                key = (i, tuple(t.source), tuple(t.resized), bool(t.hflip))
                if key not in cache:
                    cache[key] = t.apply_boxes(bx)
                out.append(cache[key])
        return out


def _flip_proposals(props: Instances, width: int) -> Instances:
    """Proposals of view 0 in its h-flipped view (objectness unchanged)."""
    out = Instances(props.image_size)
    b = props.proposal_boxes.tensor
    out.proposal_boxes = Boxes(torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1))
    out.objectness_logits = props.objectness_logits
    return out
