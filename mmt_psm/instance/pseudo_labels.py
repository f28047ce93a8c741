"""MMT-PSM steps 2-3: the teacher's pseudo-labels, its foreground map, and proposals labelled against them."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Sequence, Tuple

import torch
from detectron2.layers import paste_masks_in_image
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.sampling import subsample_labels
from detectron2.structures import ImageList, Instances, pairwise_iou


@contextlib.contextmanager
def training_topk(rpn: RPN) -> Iterator[None]:
    """Let an eval-mode RPN keep its *training* pre/post-NMS top-N (it then needs no ground truth)."""
    pre, post = dict(rpn.pre_nms_topk), dict(rpn.post_nms_topk)
    rpn.pre_nms_topk = {False: pre[True], True: pre[True]}
    rpn.post_nms_topk = {False: post[True], True: post[True]}
    try:
        yield
    finally:
        rpn.pre_nms_topk, rpn.post_nms_topk = pre, post


def filter_by_score(detections: List[Instances], thresholds: Sequence[float]) -> List[Instances]:
    """Keep detections scoring >= their class's threshold (one value = every class)."""
    if len(thresholds) == 1:
        return [det[det.scores >= float(thresholds[0])] for det in detections]
    out, thr = [], None
    for det in detections:
        if thr is None or thr.device != det.scores.device:  # one host-to-device copy per call, not per image
            thr = det.scores.new_tensor([float(t) for t in thresholds])
        out.append(det[det.scores >= thr[det.pred_classes]])
    return out


def foreground_map(
    detections: List[Instances], images: ImageList, mask_threshold: float = 0.5, mode: str = "union"
) -> torch.Tensor:
    """The detections' pasted masks (prob > threshold) as a ``[B, 1, H, W]`` float map on the padded batch
    (zeros in the padding and for images without detections): their union (``mode="union"``, {0, 1}) or their
    sum (``"sum"``, the authors' ``integral_mask``: overlapping cells count once each, so after the per-level
    average pooling a cell boundary region where two cells overlap passes the 0.5 threshold more easily)."""
    if mode not in ("union", "sum"):
        raise ValueError(f"foreground map mode must be 'union' or 'sum', got {mode!r}")
    b, _, h, w = images.tensor.shape
    fg = images.tensor.new_zeros((b, 1, h, w), dtype=torch.float32)
    for i, (det, (ih, iw)) in enumerate(zip(detections, images.image_sizes)):
        if len(det) == 0 or not det.has("pred_masks"):
            continue
        masks = paste_masks_in_image(det.pred_masks[:, 0], det.pred_boxes, (ih, iw), threshold=mask_threshold)
        fg[i, 0, :ih, :iw] = masks.any(dim=0).float() if mode == "union" else masks.float().sum(dim=0)
    return fg


def pseudo_targets(detections: List[Instances]) -> List[Instances]:
    """Detections as training targets (``gt_boxes``, ``gt_classes``)."""
    out = []
    for det in detections:
        t = Instances(det.image_size)
        t.gt_boxes = det.pred_boxes.clone()
        t.gt_classes = det.pred_classes.clone()
        out.append(t)
    return out


@torch.no_grad()
def label_and_sample(
    proposals: List[Instances],
    targets: List[Instances],
    num_classes: int,
    iou_threshold: float = 0.5,
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
    return_indices: bool = False,
    return_num_positives: bool = False,
) -> Tuple[List, ...]:
    """Label proposals by IoU with the pseudo boxes (fg = the box's class, else background = ``num_classes``)
    and sample ``batch_size_per_image`` per image with at most ``positive_fraction`` positives.

    Returns per image the sampled proposal boxes and their labels (and, with ``return_indices``, their indices
    in the image's proposals: no box is added, so every sampled box is a proposal; then, with
    ``return_num_positives``, the number of positives as host ints). Each image's sample lists its positives
    first, so ``boxes[:n]`` are its ``n`` positives without a boolean index (a device sync).
    """
    matcher = Matcher([iou_threshold], [0, 1], allow_low_quality_matches=False)
    boxes_out, labels_out, kept, num_pos = [], [], [], []
    for props, tgt in zip(proposals, targets):
        boxes = props.proposal_boxes
        if len(tgt) > 0:
            idx, match = matcher(pairwise_iou(tgt.gt_boxes, boxes))
            labels = tgt.gt_classes[idx].clone()
            labels[match == 0] = num_classes
        else:
            labels = torch.full((len(boxes),), num_classes, dtype=torch.long, device=boxes.device)
        pos, neg = subsample_labels(labels, batch_size_per_image, positive_fraction, num_classes)
        keep = torch.cat([pos, neg])
        boxes_out.append(boxes[keep])
        labels_out.append(labels[keep])
        kept.append(keep)
        num_pos.append(len(pos))
    out = (boxes_out, labels_out, kept) if return_indices else (boxes_out, labels_out)
    return out + (num_pos,) if return_num_positives else out
