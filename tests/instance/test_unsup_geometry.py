"""MMT-PSM geometry, asserted on hand-made inputs: foreground map, proposal labelling and sampling, the RPN's
training top-N, and a padded multi-image batch with flipped teacher views mapped back to view 0's frame."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from common import tiny_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn

import mmt_psm.instance.mmt_psm_rcnn as rcnn
from mmt_psm.instance.pseudo_labels import foreground_map, label_and_sample, training_topk
from mmt_psm.instance.views import ViewTransform, flip_feature_map, level_width, make_unlabeled_views


def _detections(size, boxes, probs):
    det = Instances(size)
    det.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    det.pred_masks = torch.tensor(probs, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 1, 28, 28).clone()
    det.pred_classes = torch.zeros(len(boxes), dtype=torch.long)
    det.scores = torch.ones(len(boxes))
    return det


def test_foreground_map_is_the_union_above_threshold_and_zero_in_padding():
    images = ImageList.from_tensors([torch.zeros(3, 40, 50), torch.zeros(3, 40, 30)], 32)
    assert images.tensor.shape[-2:] == (64, 64)
    # image 0: two overlapping boxes (prob 1), one below the threshold (0.4), one running past the image edge
    det0 = _detections((40, 50), [[4, 4, 20, 20], [10, 10, 30, 30], [35, 5, 45, 15], [40, 30, 70, 60]],
                       [1.0, 1.0, 0.4, 1.0])
    det1 = _detections((40, 30), [], [])
    fg = foreground_map([det0, det1], images, mask_threshold=0.5)
    expected = torch.zeros(2, 1, 64, 64)
    expected[0, 0, 4:20, 4:20] = 1
    expected[0, 0, 10:30, 10:30] = 1
    expected[0, 0, 30:40, 40:50] = 1  # clipped to the 40 x 50 image: nothing in the padding
    assert fg.dtype == torch.float32 and fg.shape == (2, 1, 64, 64)
    assert torch.equal(fg, expected)
    # a lower threshold lets the 0.4 mask in
    expected[0, 0, 5:15, 35:45] = 1
    assert torch.equal(foreground_map([det0, det1], images, mask_threshold=0.3), expected)


def _props(boxes):
    p = Instances((100, 100))
    p.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    return p


def _targets(boxes, classes):
    t = Instances((100, 100))
    t.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    t.gt_classes = torch.tensor(classes, dtype=torch.long)
    return t


def test_label_and_sample_labels_by_iou_at_the_threshold():
    # IoU with gt [0,0,10,10]: 1, exactly 0.5 (100/200), 0.476 (100/210); [20,20,30,30] matches the class-0 box
    props = [[0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 21], [20, 20, 30, 30], [50, 50, 60, 60]]
    expected = {0: 1, 1: 1, 2: 2, 3: 0, 4: 2}  # proposal -> label (2 = background for 2 classes)
    torch.manual_seed(0)
    (boxes,), (labels,) = label_and_sample([_props(props)], [_targets([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 0])],
                                           num_classes=2, iou_threshold=0.5, batch_size_per_image=8,
                                           positive_fraction=1.0)
    got = {props.index(b): int(lab) for b, lab in zip(boxes.tensor.tolist(), labels)}
    assert got == expected
    (_,), (labels,) = label_and_sample([_props(props)], [_targets([], [])], 2, 0.5, 8, 1.0)
    assert sorted(labels.tolist()) == [2] * 5  # no pseudo-label: every proposal is background


def test_label_and_sample_lists_positives_first_and_counts_them_on_the_host():
    # the model slices each image's positives as boxes[:n] (no boolean index, no device sync)
    pos = [[0, 0, 10, 10 + i * 0.25] for i in range(6)]
    neg = [[60 + i, 60, 70 + i, 70] for i in range(9)]
    torch.manual_seed(0)
    targets = [_targets([[0, 0, 10, 10]], [1]), _targets([], [])]
    boxes, labels, kept, num_pos = label_and_sample([_props(neg + pos), _props(pos + neg)], targets, 2, 0.5, 8, 0.5,
                                                    return_indices=True, return_num_positives=True)
    assert num_pos == [4, 0] and all(isinstance(n, int) for n in num_pos)
    for b, lab, n in zip(boxes, labels, num_pos):
        assert bool((lab[:n] != 2).all()) and bool((lab[n:] == 2).all()) and len(lab) == len(b) == 8
    assert len(label_and_sample([_props(pos)], targets[:1], 2, 0.5, 8, 0.5)) == 2  # default: boxes, labels


@pytest.mark.parametrize("n_neg,kept_pos,kept_neg", [(20, 2, 6), (3, 2, 3)])
def test_label_and_sample_caps_the_positive_fraction(n_neg, kept_pos, kept_neg):
    pos = [[0, 0, 10, 10 + i * 0.25] for i in range(20)]  # 20 proposals with IoU >= 0.5 to the gt box
    neg = [[60 + i, 60, 70 + i, 70] for i in range(n_neg)]
    torch.manual_seed(0)
    (boxes,), (labels,) = label_and_sample([_props(pos + neg)], [_targets([[0, 0, 10, 10]], [1])], 2, 0.5,
                                           batch_size_per_image=8, positive_fraction=0.25)
    assert int((labels == 1).sum()) == kept_pos and int((labels == 2).sum()) == kept_neg
    assert all(b in pos for b, lab in zip(boxes.tensor.tolist(), labels) if lab == 1)
    assert len(set(map(tuple, boxes.tensor.tolist()))) == len(boxes)  # sampled without replacement


def test_training_topk_gives_the_eval_rpn_its_training_settings_and_restores_them(tmp_path):
    cfg = tiny_cfg(str(tmp_path))
    cfg.merge_from_list(["MODEL.RPN.PRE_NMS_TOPK_TEST", 77, "MODEL.RPN.POST_NMS_TOPK_TEST", 33])
    rpn = build_model(cfg).proposal_generator.eval()
    before = (dict(rpn.pre_nms_topk), dict(rpn.post_nms_topk))
    assert before == ({True: 400, False: 77}, {True: 200, False: 33})
    with training_topk(rpn):
        assert rpn.pre_nms_topk == {True: 400, False: 400} and rpn.post_nms_topk == {True: 200, False: 200}
    assert (rpn.pre_nms_topk, rpn.post_nms_topk) == before
    with pytest.raises(RuntimeError), training_topk(rpn):
        raise RuntimeError("inside")
    assert (rpn.pre_nms_topk, rpn.post_nms_topk) == before


class FlipEquivariantBackbone(nn.Module):
    """Stand-in FPN: per level, max-pool the image with kernel = stride, then a 1x1 conv. Exactly
    flip-equivariant within any width that is a multiple of the largest stride."""

    def __init__(self, strides, channels):
        super().__init__()
        self.strides = dict(strides)
        self.proj = nn.Conv2d(3, channels, 1)
        self.size_divisibility = 32

    def forward(self, x):
        return {k: self.proj(F.max_pool2d(x, s, s, ceil_mode=True)) for k, s in self.strides.items()}


@pytest.fixture
def flipped_batch_model(tmp_path):
    cfg = tiny_cfg(str(tmp_path), meta="MMTPSMRCNN")
    cfg.merge_from_list(["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.MMT_PSM.STUDENT_BOX_DROPOUT", 0.0])
    torch.manual_seed(0)
    model = build_model(cfg)
    standin = FlipEquivariantBackbone(model.strides, cfg.MODEL.FPN.OUT_CHANNELS)
    model.student.backbone, model.teacher.backbone = standin, standin
    rng = np.random.default_rng(0)
    batch = []
    for h, w in [(128, 128), (96, 64)]:  # different widths: the second image is padded by 64 columns
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        views = make_unlabeled_views(image, np.random.default_rng(1), base_flip_prob=0.0)
        batch.append(dict(views, labeled=False, height=h, width=w))
    assert [t.hflip for t in batch[0]["teacher_transforms"]] == [False, True, False, True]
    return model, batch


def test_flipped_teacher_views_of_a_padded_batch_map_back_exactly(flipped_batch_model, monkeypatch):
    model, batch = flipped_batch_model
    widths = [d["width"] for d in batch]
    pooled = []  # per view through _box_logits: (boxes per image, pooled RoI features)
    views_per_call = []  # the teacher's views go through the box branch in one batched call

    def record_box_logits(m, features, boxes):
        heads = m.roi_heads
        x = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
        n_img, start = len(batch), 0
        views_per_call.append(len(boxes) // n_img)
        for v in range(len(boxes) // n_img):  # the call's boxes and pooled rows are view-major
            view_boxes = boxes[v * n_img:(v + 1) * n_img]
            n = sum(len(b) for b in view_boxes)
            pooled.append(([b.tensor.clone() for b in view_boxes], x[start:start + n]))
            start += n
        return orig(m, features, boxes)

    orig = model._box_logits
    monkeypatch.setattr(model, "_box_logits", lambda m, f, b: record_box_logits(m, f, b))
    # every view's sampled proposals through _box_logits (view 0 would otherwise reuse its detection pass's
    # logits; tests/instance/test_view_ensemble.py shows both give the same logits)
    detect = model._teacher_detections
    n_views = len(batch[0]["teacher_views"])
    monkeypatch.setattr(model, "_teacher_detections", lambda *a, **k: (detect(*a, **k)[0], [None] * n_views))
    mgd = []
    real_mgd = rcnn.mask_guided_feature_loss
    monkeypatch.setattr(rcnn, "mask_guided_feature_loss",
                        lambda s, t, fg, **k: mgd.append(t) or real_mgd(s, t, fg, **k))
    with EventStorage(start_iter=10):
        out = model.unsupervised_losses(batch)
    assert torch.isfinite(out["loss_psm"]) and torch.isfinite(out["loss_mgd"])
    assert len(pooled) == 5 and len(mgd) == 4  # 4 teacher views + the student; mgd per teacher view
    assert views_per_call == [4, 1]  # one box-branch pass for all teacher views, one for the student

    for v in (1, 3):  # flipped views: per image, x -> W_i - x (the image's own width, not the padded one)
        for i, w in enumerate(widths):
            b0, b1 = pooled[0][0][i], pooled[v][0][i]
            assert len(b0) > 0
            hand = torch.stack([w - b0[:, 2], b0[:, 1], w - b0[:, 0], b0[:, 3]], dim=1)
            assert torch.equal(b1, hand)
            back = ViewTransform((128, w), (128, w), True).inverse_boxes(b1)
            torch.testing.assert_close(back, b0, rtol=0, atol=1e-5)
        # the RoI features of the flipped boxes on the flipped view are the mirrored RoI features of view v-1.
        # RoIAlign clamps samples left of column 0 but interpolates into the padding right of a narrow image,
        # so RoIs within half the coarsest pooled stride (16 px) of a side of the padded image are left out
        boxes0 = torch.cat(pooled[0][0])
        image_w = torch.cat([torch.full((len(b),), float(w)) for b, w in zip(pooled[0][0], widths)])
        inner = (boxes0[:, 0] >= 16) & (boxes0[:, 2] <= image_w - 16) | (image_w == max(widths))
        assert inner[len(pooled[0][0][0]):].sum() > 10  # the padded image still has many RoIs compared
        torch.testing.assert_close(pooled[v][1][inner], pooled[v - 1][1][inner].flip(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(pooled[4][0][0], pooled[0][0][0])  # the student (unflipped) gets view 0's boxes

    for v in (1, 3):  # teacher feature maps of flipped views, flipped back, equal the unflipped copy's maps
        for level in mgd[v]:
            torch.testing.assert_close(mgd[v][level], mgd[v - 1][level], rtol=1e-6, atol=1e-6)
    # the padding is real: a whole-width flip (ignoring each image's width) would NOT map back
    raw = flip_feature_map(mgd[1]["p3"], [level_width(w, 8) for w in widths])  # view 1's own p3 maps
    assert torch.allclose(raw[0].flip(-1), mgd[0]["p3"][0], atol=1e-6)  # unpadded image: either way
    assert not torch.allclose(raw[1].flip(-1), mgd[0]["p3"][1], atol=1e-3)  # padded image: only per-image


def test_flipped_student_view_is_rejected(flipped_batch_model):
    model, batch = flipped_batch_model
    batch[1]["student_transform"] = ViewTransform((96, 64), (96, 64), True)
    with EventStorage(start_iter=10), pytest.raises(ValueError, match="flipped student view is not supported"):
        model.unsupervised_losses(batch)


def test_teacher_view_flipped_in_only_some_images_is_rejected(flipped_batch_model):
    model, batch = flipped_batch_model
    batch[1]["teacher_transforms"] = list(batch[1]["teacher_transforms"])
    batch[1]["teacher_transforms"][1] = ViewTransform((96, 64), (96, 64), False)
    with EventStorage(start_iter=10), pytest.raises(ValueError, match="flipped in all images of a batch or in none"):
        model.unsupervised_losses(batch)
