"""Issue 8's switches beyond the paper, on hand-made inputs: weighted fusion of the teacher's views, per-class
pseudo-label thresholds, the summed foreground map, mask distillation, labeled hue/erasing; and one real
MMT-PSM step with all of them on."""
import math

import numpy as np
import pytest
import torch
from common import tiny_cfg, tiny_synthetic, unlabeled_view_batch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from mmt_psm.instance import mmt_psm_rcnn as rcnn
from mmt_psm.instance.augment import RandomErasing, RandomHue
from mmt_psm.instance.mapper import CellDatasetMapper
from mmt_psm.instance.pseudo_labels import filter_by_score, foreground_map
from mmt_psm.instance.view_ensemble import (
    fuse_view_detections,
    mask_distillation_loss,
    subsample_positives,
    teacher_view_masks,
)
from mmt_psm.instance.view_mapper import MMTPSMViewMapper

W = 100


def _dets(boxes, scores, classes, masks=None):
    d = Instances((80, W))
    d.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    d.scores = torch.tensor(scores, dtype=torch.float32)
    d.pred_classes = torch.tensor(classes, dtype=torch.long)
    if masks is not None:
        d.pred_masks = torch.as_tensor(masks, dtype=torch.float32).reshape(len(scores), 1, 2, 2)
    return d


def _mirror(box):
    x0, y0, x1, y1 = box
    return [W - x1, y0, W - x0, y1]


def test_fusion_averages_a_cell_seen_in_both_views_and_divides_a_lone_one():
    left = [[1.0, 0.0], [0.0, 0.0]]  # mask probability only in the top-left of the box
    a0, a1, lone = [10, 10, 30, 30], [12, 10, 32, 30], [60, 40, 80, 70]
    view0 = _dets([a0, lone], [0.9, 0.6], [0, 1], [left, left])
    # view 1 is view 0 flipped: the same cell, shifted 2 px, found there with score 0.6; its mask is mirrored
    view1 = _dets([_mirror(a1)], [0.6], [0], [[[0.0, 1.0], [0.0, 0.0]]])
    fused = fuse_view_detections([view0, view1], [False, True], iou_threshold=0.5)
    assert len(fused) == 2
    # best first: the cell in both views, score (0.9 + 0.6) / 2, box = score-weighted mean
    assert torch.allclose(fused.scores, torch.tensor([0.75, 0.3]))
    expected = (0.9 * torch.tensor(a0, dtype=torch.float32) + 0.6 * torch.tensor(a1, dtype=torch.float32)) / 1.5
    assert torch.allclose(fused.pred_boxes.tensor[0], expected)
    assert torch.allclose(fused.pred_boxes.tensor[1], torch.tensor(lone, dtype=torch.float32))
    assert fused.pred_classes.tolist() == [0, 1]
    # both views' masks are "top-left" in view 0's frame, so the fused mask is too
    assert torch.allclose(fused.pred_masks[0, 0], torch.tensor(left))


def test_fusion_keeps_classes_apart_and_handles_no_detections():
    box = [10, 10, 30, 30]
    fused = fuse_view_detections([_dets([box], [0.8], [0]), _dets([box], [0.4], [1])], [False, False], 0.5)
    assert sorted(fused.pred_classes.tolist()) == [0, 1]
    assert torch.allclose(fused.scores.sort().values, torch.tensor([0.2, 0.4]))
    empty = fuse_view_detections([_dets([], [], []), _dets([], [], [])], [False, True])
    assert len(empty) == 0
    with pytest.raises(ValueError, match="flip flags"):
        fuse_view_detections([_dets([], [], [])], [False, True])


def test_per_class_thresholds_filter_each_class_by_its_own_value():
    d = _dets([[0, 0, 5, 5]] * 4, [0.3, 0.6, 0.3, 0.6], [0, 0, 1, 1])
    kept = filter_by_score([d], (0.5, 0.2))[0]
    assert kept.scores.tolist() == pytest.approx([0.6, 0.3, 0.6])
    assert kept.pred_classes.tolist() == [0, 1, 1]
    assert len(filter_by_score([d], (0.5,))[0]) == 2


def test_summed_foreground_map_counts_overlaps_and_union_does_not():
    images = ImageList.from_tensors([torch.zeros(3, 40, 40)], 32)
    d = Instances((40, 40))
    d.pred_boxes = Boxes(torch.tensor([[0.0, 0, 20, 20], [10, 10, 30, 30]]))
    d.pred_masks = torch.ones(2, 1, 28, 28)
    summed = foreground_map([d], images, 0.5, mode="sum")
    union = foreground_map([d], images, 0.5, mode="union")
    assert summed[0, 0, 15, 15] == 2 and union[0, 0, 15, 15] == 1
    assert summed[0, 0, 5, 5] == 1 and summed[0, 0, 35, 35] == 0
    assert torch.equal(summed.clamp(max=1), union)
    with pytest.raises(ValueError, match="union"):
        foreground_map([d], images, 0.5, mode="max")


def test_teacher_view_masks_pick_the_class_channel_and_flip_back():
    labels = torch.tensor([1])
    v0 = torch.full((1, 2, 2, 2), -20.0)
    v0[0, 1, 0, 0] = 20.0  # class 1, top-left
    v1 = torch.full((1, 2, 2, 2), -20.0)
    v1[0, 1, 0, 1] = 0.0  # flipped view: top-right = top-left after the flip back, probability 0.5
    m = teacher_view_masks([v0, v1], labels, [False, True])
    assert torch.allclose(m, torch.tensor([[[0.75, 0.0], [0.0, 0.0]]]), atol=1e-6)


def test_mask_distillation_is_minimal_at_the_teacher_and_zero_without_positives():
    target = torch.tensor([[[0.2, 0.9], [0.5, 0.7]]])
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2] = torch.logit(target[0])
    logits.requires_grad_(True)
    loss = mask_distillation_loss(logits, torch.tensor([2]), target)
    loss.backward()
    assert torch.allclose(logits.grad, torch.zeros_like(logits), atol=1e-6)
    entropy = -(target * target.log() + (1 - target) * (1 - target).log()).mean()
    assert float(loss) == pytest.approx(float(entropy), rel=1e-5)
    empty = torch.zeros(0, 3, 2, 2, requires_grad=True)
    zero = mask_distillation_loss(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, 2))
    assert float(zero) == 0.0 and zero.requires_grad


def test_labeled_hue_and_erasing_change_the_image_only():
    rng_state = np.random.get_state()
    np.random.seed(0)
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 2] = 200  # red in BGR
    t = RandomHue(0.25, "BGR").get_transform(img)
    out = t.apply_image(img)
    assert out.shape == img.shape and not np.array_equal(out, img)
    seg = np.arange(64 * 64).reshape(64, 64)
    assert np.array_equal(t.apply_segmentation(seg), seg)
    gray = np.full((64, 64, 3), 90, np.uint8)
    erased = RandomErasing(1.0, max_patches=10, area=(0.05, 0.05)).get_transform(gray)
    changed = (erased.apply_image(gray) != gray).any(axis=2).mean()
    assert 0.0 < changed <= 10 * 0.05 + 1e-9  # at most 10 patches of 5 %
    coords = np.array([[3.0, 4.0]])
    assert np.array_equal(erased.apply_coords(coords), coords)
    with pytest.raises(ValueError, match="probability"):
        RandomErasing(0.0)
    np.random.set_state(rng_state)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tiny_synthetic(str(tmp_path_factory.mktemp("tiny")), prefix="ens")
    return "ens"


def test_mapper_applies_labeled_hue_and_erasing_from_the_config(data, tmp_path):
    cfg = tiny_cfg(str(tmp_path), data)
    cfg.merge_from_list(["INPUT.HUE", 0.05, "INPUT.ERASE_PROB", 0.7])
    names = [type(a).__name__ for a in CellDatasetMapper(cfg, True).augmentations.augs]
    assert names[-2:] == ["RandomHue", "RandomErasing"]
    assert "RandomErasing" not in [type(a).__name__ for a in CellDatasetMapper(cfg, False).augmentations.augs]


def test_mmt_psm_step_with_every_switch_on(data, tmp_path):
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.merge_from_list([
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.MMT_PSM.FUSE_ALL_VIEWS", True,
        "MODEL.MMT_PSM.MASK_DISTILL", True, "MODEL.MMT_PSM.MASK_DISTILL_WEIGHT", 2.0,
        "MODEL.MMT_PSM.FG_MAP", "sum", "MODEL.MMT_PSM.PSEUDO_SCORE_THRESH_PER_CLASS", (0.0, 0.0),
    ])
    torch.manual_seed(0)
    model = build_model(cfg)
    lab = CellDatasetMapper(cfg, True)(DatasetCatalog.get(f"{data}_train")[0])
    unl = MMTPSMViewMapper(cfg)(DatasetCatalog.get(f"{data}_unlabeled")[0])
    lab["labeled"], unl["labeled"] = True, False
    with EventStorage(start_iter=10) as storage:
        losses = model([lab, unl])
        sum(losses.values()).backward()
    assert all(math.isfinite(float(v)) for v in losses.values())
    assert float(losses["loss_mask_distill"]) > 0
    raw = storage.latest()["mmt_psm/loss_mask_distill_raw"][0]
    w = storage.latest()["mmt_psm/unsup_weight"][0]
    assert float(losses["loss_mask_distill"]) == pytest.approx(raw * w * 2.0, rel=1e-5)
    assert storage.latest()["mmt_psm/pseudo_labels_per_image"][0] > 0
    mask_grad = sum(p.grad.abs().sum() for p in model.student.roi_heads.mask_head.parameters() if p.grad is not None)
    assert mask_grad > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    # burn-in: the switch adds an exact zero (so DDP sees the mask head used on every step)
    with EventStorage(start_iter=0):
        assert float(model([lab, unl])["loss_mask_distill"]) == 0.0


def test_per_class_thresholds_must_match_the_class_count(data, tmp_path):
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.merge_from_list(["MODEL.MMT_PSM.PSEUDO_SCORE_THRESH_PER_CLASS", (0.1, 0.2, 0.3)])
    with pytest.raises(ValueError, match="3 pseudo-label score thresholds for 2 classes"):
        build_model(cfg)


def _plus_model(data, tmp_path):
    """A tiny MMT-PSM with plus's switches (fusion + mask distillation, no feature loss, every detection a
    pseudo-label), and a list that the teacher's mask head appends its number of boxes to on every call."""
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.merge_from_list([
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.MMT_PSM.FUSE_ALL_VIEWS", True,
        "MODEL.MMT_PSM.MASK_DISTILL", True, "MODEL.MMT_PSM.MGD_LOSS", False,
    ])
    torch.manual_seed(0)
    model = build_model(cfg)
    rois = []
    model.teacher.roi_heads.mask_head.predictor.register_forward_hook(lambda m, inp, out: rois.append(out.shape[0]))
    return cfg, model, rois


def test_teacher_mask_head_is_skipped_when_nothing_reads_the_pseudo_label_masks(data, tmp_path):
    # plus's switches (fusion + mask distillation, no feature loss): the pseudo-labels' masks feed nothing, so the
    # teacher's mask head runs only on the sampled positives for distillation, and the losses are the same
    # (bit for bit) as when the masks are computed for a recording step
    cfg, model, rois = _plus_model(data, tmp_path)
    unl = MMTPSMViewMapper(cfg)(DatasetCatalog.get(f"{data}_unlabeled")[0])
    unl["labeled"] = False
    runs = {}
    for record in (False, True):
        model.record_pseudo_labels = record
        rois.clear()
        with EventStorage(start_iter=10) as storage:
            torch.manual_seed(1)
            runs[record] = ({k: v.detach().clone() for k, v in model.unsupervised_losses([unl]).items()},
                            list(rois), storage.latest())
    (skip, skip_rois, skip_log), (full, full_rois, full_log) = runs[False], runs[True]
    assert skip.keys() == full.keys() and all(torch.equal(skip[k], full[k]) for k in skip)
    dets = full_log["mmt_psm/pseudo_labels_per_image"][0]
    assert dets > 0 and skip_log["mmt_psm/pseudo_labels_per_image"][0] == dets
    # recording: the mask head on every view's detections, then on the positives; skipping: the positives only
    # (each one batched pass over all views)
    assert len(full_rois) == 2 and full_rois[1:] == skip_rois and len(skip_rois) == 1
    assert "mmt_psm/fg_fraction" in full_log and "mmt_psm/fg_fraction" not in skip_log
    assert model._last_pseudo[1][0].has("pred_masks")


@pytest.mark.parametrize("fuse", [True, False])
def test_sampled_proposals_reuse_the_teacher_view_logits_of_its_detection_pass(data, tmp_path, monkeypatch,
                                                                                 fuse):
    # the teacher's box branch already scored every proposal on each view it detected on (all views with
    # FUSE_ALL_VIEWS, view 0 without); the sampled proposals' logits are those rows, not a second box pass
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.merge_from_list(["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.MMT_PSM.FUSE_ALL_VIEWS", fuse,
                         "MODEL.MMT_PSM.MASK_DISTILL", fuse])
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = unlabeled_view_batch(cfg, f"{data}_unlabeled", 2)  # two images: rows offset by the first's proposals
    n_views = len(batch[0]["teacher_views"])
    assert any(t.hflip for t in batch[0]["teacher_transforms"])  # flipped views score mapped proposals
    rows, stacked = [], []
    model.teacher.roi_heads.box_predictor.register_forward_hook(lambda m, inp, out: rows.append(out[0].shape[0]))
    proposals = []  # the teacher RPN's proposals per call (view 0 of both images)
    model.teacher.proposal_generator.register_forward_hook(lambda m, inp, out: proposals.append(out[0]))
    detect = model._teacher_detections
    sensitivity = rcnn.proposal_sensitivity

    def recording(logits):
        stacked.append(logits.clone())
        return sensitivity(logits)

    monkeypatch.setattr(rcnn, "proposal_sensitivity", recording)

    runs = {}
    for reuse in (True, False):
        model._teacher_detections = detect if reuse else (
            lambda *a, **k: (detect(*a, **k)[0], [None] * n_views))
        rows.clear()
        with EventStorage(start_iter=10):
            torch.manual_seed(1)
            runs[reuse] = ({k: v.detach().clone() for k, v in model.unsupervised_losses(batch).items()}, list(rows))
    (new, new_rows), (old, old_rows) = runs[True], runs[False]
    assert new.keys() == old.keys() and float(new["loss_psm"]) > 0
    for k in new:
        torch.testing.assert_close(new[k], old[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stacked[0], stacked[1], rtol=1e-5, atol=1e-5)
    # the teacher's box branch runs once on the proposals of every view it detects on (view-major batch) and once
    # more on the sampled proposals of every other view: without fusion views 1.. score the sample
    n_sampled, detect = stacked[0].shape[1], old_rows[0]
    assert new_rows == ([detect] if fuse else [detect, (n_views - 1) * n_sampled])
    assert old_rows == [detect, n_views * n_sampled]
    assert detect == sum(len(p) for p in proposals[0]) * (n_views if fuse else 1)


def test_subsample_positives_keeps_at_most_n_pairs_per_image_in_order():
    # box i of image 0 encodes i in x0 and its label is i % 2, so a kept pair must still agree
    boxes = [Boxes(torch.tensor([[i, 0.0, i + 5, 5] for i in range(7)])), Boxes(torch.tensor([[1.0, 1, 4, 4]] * 2))]
    labels = [torch.arange(7) % 2, torch.tensor([1, 0])]
    torch.manual_seed(3)
    b, lab = subsample_positives(boxes, labels, 3)
    x0 = b[0].tensor[:, 0].long()
    assert len(b[0]) == 3 and torch.equal(lab[0], x0 % 2) and torch.equal(x0, x0.sort().values)
    assert len(set(x0.tolist())) == 3
    assert b[1] is boxes[1] and lab[1] is labels[1]  # 2 <= 3: kept whole
    torch.manual_seed(3)
    assert torch.equal(subsample_positives(boxes, labels, 3)[0][0].tensor, b[0].tensor)  # SEED fixes the draw
    draws = set()
    for s in range(20):
        torch.manual_seed(s)
        draws.add(tuple(subsample_positives(boxes, labels, 3)[0][0].tensor[:, 0].long().tolist()))
    assert len(draws) > 5  # a random subset, not always the first three


def test_mask_distillation_cap_bounds_the_teacher_mask_head_and_is_exact_when_not_reached(data, tmp_path,
                                                                                         monkeypatch):
    cfg, model, rois = _plus_model(data, tmp_path)
    batch = unlabeled_view_batch(cfg, f"{data}_unlabeled", 2)
    mask_boxes = []  # per _mask_logits call: (student?, the boxes of both images)
    mask_logits = model._mask_logits

    def recording(m, feats, boxes):
        mask_boxes.append((m is model.student, [b.tensor.clone() for b in boxes]))
        return mask_logits(m, feats, boxes)

    monkeypatch.setattr(model, "_mask_logits", recording)
    runs = {}
    for cap in (0, 100000, 2):
        model.mask_distill_max_positives = cap
        rois.clear()
        mask_boxes.clear()
        with EventStorage(start_iter=10) as storage:
            torch.manual_seed(1)
            losses = model.unsupervised_losses(batch)
            runs[cap] = ({k: v.detach().clone() for k, v in losses.items()}, list(rois),
                         storage.latest()["mmt_psm/positives_per_image"][0], list(mask_boxes))
    (full, full_rois, pos, full_boxes), (big, big_rois, _, _), (two, two_rois, pos_two, two_boxes) = (
        runs[0], runs[100000], runs[2])
    n_views = len(batch[0]["teacher_views"])
    # every positive of both images, in every view: one batched mask-head pass over the views
    assert pos > 2 and full_rois == [round(2 * pos) * n_views]
    assert big_rois == full_rois and all(torch.equal(big[k], full[k]) for k in full)  # a cap not reached: exact
    assert two_rois == [2 * 2 * n_views]  # 2 positives per image in each view
    # the student distils exactly the positives the teacher's targets were made for (view 0 is not flipped; the
    # teacher's one call has view 0's boxes first), and they are a subset of the uncapped run's positives
    assert [s for s, _ in two_boxes] == [False, True] and len(two_boxes[0][1]) == 2 * n_views
    assert not batch[0]["teacher_transforms"][0].hflip
    for img in range(2):
        student, teacher0, every = two_boxes[-1][1][img], two_boxes[0][1][img], full_boxes[-1][1][img]
        assert len(student) == 2 and torch.equal(student, teacher0)
        assert all((every == box).all(dim=1).any() for box in student)
    assert pos_two == pos  # the cap is on mask distillation only: loss_psm still samples every positive
    assert math.isfinite(float(two["loss_mask_distill"])) and float(two["loss_mask_distill"]) > 0
    cfg.MODEL.MMT_PSM.MASK_DISTILL_MAX_POSITIVES = -1
    with pytest.raises(ValueError, match="MASK_DISTILL_MAX_POSITIVES must be >= 0"):
        build_model(cfg)


def test_fusion_of_fp16_detections_of_a_large_image_is_computed_in_fp32():
    """AMP: the teacher runs under fp16 autocast (its scores / masks fp16; Detectron2's Boxes are fp32, but autocast
    runs a matmul in fp16): 4 views' score-weighted coordinates of a box at x ~ 20000 exceed fp16's 65504; the
    fusion runs in fp32 outside autocast and equals the fp32 one."""
    size = (30000, 30000)
    box = [20000.0, 20000.0, 20400.0, 20400.0]

    def view(dtype):
        d = Instances(size)
        d.pred_boxes = Boxes(torch.tensor([box], dtype=dtype))
        d.scores = torch.tensor([0.75], dtype=dtype)
        d.pred_classes = torch.tensor([0])
        d.pred_masks = torch.full((1, 1, 2, 2), 0.5, dtype=dtype)
        return d

    with torch.autocast("cpu", dtype=torch.float16):
        half = fuse_view_detections([view(torch.float16) for _ in range(4)], [False] * 4, iou_threshold=0.5)
    full = fuse_view_detections([view(torch.float32) for _ in range(4)], [False] * 4, iou_threshold=0.5)
    assert half.pred_boxes.tensor.dtype == torch.float32 and torch.isfinite(half.pred_boxes.tensor).all()
    assert torch.allclose(half.pred_boxes.tensor, full.pred_boxes.tensor) and half.pred_boxes.tensor[0].tolist() == box
    assert torch.allclose(half.scores, full.scores) and half.scores.tolist() == [0.75]
    assert torch.allclose(half.pred_masks, full.pred_masks)
