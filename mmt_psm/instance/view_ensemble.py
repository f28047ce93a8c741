"""Switches beyond the paper that use the teacher's K views more (all off in ``configs/mmt_psm_R50.yaml``).

* :func:`fuse_view_detections` (``MODEL.MMT_PSM.FUSE_ALL_VIEWS``): the teacher's detections on every view,
  mapped to view 0's frame, fused per class by score-weighted box/mask averaging of clusters (weighted box
  fusion): a cell found in only one of V views keeps 1/V of its score, so view-unstable detections fall below
  the pseudo-label threshold. The paper takes pseudo-labels from view 0 alone.
* :func:`mask_distillation_loss` (``MODEL.MMT_PSM.MASK_DISTILL``): the student's mask head on the PSM
  positives learns the teacher's view-ensembled mask probabilities (:func:`teacher_view_masks`) with a soft
  binary cross-entropy. The paper distils only class logits (loss_psm) and masked features (loss_mgd); this is
  the direct lever on the mask quality of cytoplasm, the class where MMT-PSM lags.
  :func:`subsample_positives` (``MODEL.MMT_PSM.MASK_DISTILL_MAX_POSITIVES``) distils a random subset of at most N
  positives per image: the expected loss is the same, and the teacher's mask head runs on fewer boxes.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances, pairwise_iou

__all__ = ["fuse_view_detections", "teacher_view_masks", "mask_distillation_loss", "subsample_positives"]


def _flip_instances(det: Instances, width: int) -> Instances:
    """Detections of an h-flipped view in the unflipped frame: boxes mirrored, box-relative masks flipped."""
    out = Instances(det.image_size)
    b = det.pred_boxes.tensor
    out.pred_boxes = Boxes(torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1))
    out.scores, out.pred_classes = det.scores, det.pred_classes
    if det.has("pred_masks"):
        out.pred_masks = det.pred_masks.flip(-1)
    return out


def fuse_view_detections(
    per_view: Sequence[Instances], flipped: Sequence[bool], iou_threshold: float = 0.55, max_dets: int = 100
) -> Instances:
    """Fuse one image's detections from V views (``per_view[v]``, in view v's frame; ``flipped[v]``: view v is
    view 0 h-flipped) into view 0's frame.

    Clusters: NMS over all views' detections per class (IoU ``iou_threshold``) picks the cluster heads; every
    detection joins the head of its class it overlaps most (IoU >= threshold). A cluster's box and 28x28 mask
    probabilities are the score-weighted means of its members, its score the sum of its members' scores over
    V, clamped to 1 (a detection seen in every view keeps about its score; in one of V, 1/V of it). At most
    ``max_dets`` fused detections, best first. ``pred_masks`` are box-relative probabilities ``[N, 1, M, M]``.
    Computed in fp32 outside autocast (the weighted coordinate sums of a few views of a large image, and box areas,
    overflow fp16's 65504); the fused boxes, scores and masks are fp32.
    """
    if len(per_view) != len(flipped) or not per_view:
        raise ValueError(f"{len(per_view)} views of detections but {len(flipped)} flip flags")
    width = per_view[0].image_size[1]
    views = [_flip_instances(d, width) if f else d for d, f in zip(per_view, flipped)]
    dets = Instances.cat(views)
    if len(dets) == 0:
        return dets
    boxes, scores, classes = dets.pred_boxes.tensor.float(), dets.scores.float(), dets.pred_classes
    with torch.autocast(device_type=boxes.device.type, enabled=False):
        return _fuse(dets, boxes, scores, classes, len(per_view), per_view[0].image_size, iou_threshold, max_dets)


def _fuse(dets: Instances, boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, num_views: int,
          image_size: Tuple[int, int], iou_threshold: float, max_dets: int) -> Instances:
    heads = batched_nms(boxes, scores, classes, iou_threshold)[:max_dets]
    iou = pairwise_iou(Boxes(boxes), Boxes(boxes[heads]))  # [N, H]
    iou = torch.where(classes[:, None] == classes[heads][None, :], iou, torch.full_like(iou, -1.0))
    best, assign = iou.max(dim=1)
    member = torch.zeros_like(iou)
    member[torch.arange(len(dets), device=iou.device), assign] = (best >= iou_threshold).to(iou.dtype)
    w = member * scores[:, None]  # [N, H]
    total = w.sum(dim=0).clamp_min(torch.finfo(w.dtype).tiny)
    out = Instances(image_size)
    out.pred_boxes = Boxes((w.t() @ boxes) / total[:, None])
    out.scores = (w.sum(dim=0) / num_views).clamp(max=1.0)
    out.pred_classes = classes[heads]
    if dets.has("pred_masks"):
        masks = dets.pred_masks.flatten(1).float()  # [N, M*M]
        out.pred_masks = ((w.t() @ masks) / total[:, None]).view(len(heads), *dets.pred_masks.shape[1:])
    order = out.scores.argsort(descending=True)
    return out[order]


def teacher_view_masks(
    view_logits: Sequence[torch.Tensor], labels: torch.Tensor, flipped: Sequence[bool]
) -> torch.Tensor:
    """Mean over views of the teacher's mask probabilities of each proposal's class, in view 0's frame.

    ``view_logits[v]``: ``[P, C, M, M]`` mask logits on the boxes mapped to view v (class-agnostic heads:
    ``C = 1``); a flipped view's masks are flipped back. Returns ``[P, M, M]`` probabilities.
    """
    probs = []
    for logits, f in zip(view_logits, flipped):
        idx = labels if logits.shape[1] > 1 else torch.zeros_like(labels)
        p = logits[torch.arange(len(labels), device=logits.device), idx].sigmoid()
        probs.append(p.flip(-1) if f else p)
    return torch.stack(probs).mean(dim=0)


def mask_distillation_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, teacher_probs: torch.Tensor
) -> torch.Tensor:
    """Soft binary cross-entropy between the student's mask logits of each positive's class (``[P, C, M, M]``)
    and the teacher's ensembled probabilities (``[P, M, M]``), averaged over pixels; ``0 * logits.sum()`` (keeps
    the graph, exact zero) when there are no positives. Its minimum over the student is the teacher's entropy,
    reached when the student's probabilities equal the teacher's."""
    if len(labels) == 0:
        return student_logits.sum() * 0.0
    idx = labels if student_logits.shape[1] > 1 else torch.zeros_like(labels)
    s = student_logits[torch.arange(len(labels), device=student_logits.device), idx]
    return F.binary_cross_entropy_with_logits(s.float(), teacher_probs.detach().float())


def subsample_positives(
    boxes: Sequence[Boxes], labels: Sequence[torch.Tensor], max_per_image: int
) -> Tuple[List[Boxes], List[torch.Tensor]]:
    """At most ``max_per_image`` of each image's positive boxes and their labels, drawn uniformly without
    replacement (torch's global generator, so ``SEED`` fixes the draw); images with fewer keep all, in order."""
    out_boxes, out_labels = [], []
    for b, lab in zip(boxes, labels):
        if len(lab) > max_per_image:
            keep = torch.randperm(len(lab), device=lab.device)[:max_per_image].sort().values
            b, lab = b[keep], lab[keep]
        out_boxes.append(b)
        out_labels.append(lab)
    return out_boxes, out_labels
