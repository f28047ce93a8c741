"""The teacher's passes batched over its views (one backbone pass on all 2K views of a batch, one box-branch pass,
one mask-head pass, one flip-back gather) equal the per-view loop (``TEACHER_VIEWS_PER_PASS 1``): the teacher's
features, the proposals' sensitivities and every unsupervised loss, on a padded batch of two image sizes; and
the batched features, view logits and flipped-back adapted features equal the teacher's modules run on each view
alone (a reference that shares no code with the batching)."""
import numpy as np
import pytest
import torch
from common import tiny_cfg, tiny_synthetic
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from mmt_psm.instance import mmt_psm_rcnn as rcnn
from mmt_psm.instance.mapper import read_image_checked
from mmt_psm.instance.views import make_unlabeled_views

PAPER = ["MODEL.RESNETS.NORM", "BN"]  # the paper config's BatchNorm backbone (eval mode in the teacher)
PLUS = ["MODEL.MMT_PSM.FUSE_ALL_VIEWS", True, "MODEL.MMT_PSM.MASK_DISTILL", True, "MODEL.MMT_PSM.MGD_LOSS", False,
        "MODEL.MMT_PSM.MASK_DISTILL_MAX_POSITIVES", 4]

REAL = (rcnn.proposal_sensitivity, rcnn.label_and_sample, rcnn.mask_guided_feature_loss)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tiny_synthetic(str(tmp_path_factory.mktemp("tiny")), prefix="bat", n_train=1, n_test=1, n_unlabeled=2)
    return "bat"


def _batch(data):
    """Views of two unlabeled images, the second cropped to 96 x 64 (padded by 64 columns in the batch)."""
    batch = []
    for d, (h, w) in zip(DatasetCatalog.get(f"{data}_unlabeled"), [(128, 128), (96, 64)]):
        image = np.ascontiguousarray(read_image_checked(d["file_name"])[:h, :w])
        views = make_unlabeled_views(image, np.random.default_rng(1), base_flip_prob=0.0)
        batch.append(dict(views, labeled=False, height=h, width=w))
    assert [t.hflip for t in batch[0]["teacher_transforms"]] == [False, True, False, True]
    return batch


def _run(model, batch, views_per_pass, monkeypatch):
    """unsupervised_losses with ``views_per_pass`` views per teacher pass; what it computed on the way."""
    rec = {"backbone": [], "sensitivity": [], "box_rows": [], "sampled": [], "t_adapted": []}
    hooks = [model.teacher.backbone.register_forward_hook(lambda m, i, out: rec["backbone"].append(out)),
             model.teacher.roi_heads.box_predictor.register_forward_hook(
                 lambda m, i, out: rec["box_rows"].append(out[0].shape[0]))]
    real, sample, mgd = REAL  # the unpatched functions (a second run must not call the first run's recorders)
    monkeypatch.setattr(rcnn, "proposal_sensitivity", lambda z: rec["sensitivity"].append((z, *real(z))) or real(z))
    monkeypatch.setattr(rcnn, "label_and_sample", lambda *a, **k: rec["sampled"].append(sample(*a, **k))
                        or rec["sampled"][-1])
    monkeypatch.setattr(rcnn, "mask_guided_feature_loss", lambda s, t, fg, **k: rec["t_adapted"].append(t)
                        or mgd(s, t, fg, **k))
    model.views_per_pass = views_per_pass
    try:
        with EventStorage(start_iter=10) as storage:
            torch.manual_seed(1)  # proposal sampling (and the positives' subsample) draw from torch's RNG
            out = model.unsupervised_losses(batch)
            rec["logged"] = {k: v[0] for k, v in storage.latest().items()}
    finally:
        for h in hooks:
            h.remove()
    rec["losses"] = {k: v.detach() for k, v in out.items()}
    return rec


@torch.no_grad()
def _per_view_reference(model, batch, boxes):
    """Straight from the teacher's modules, one view at a time: its features, the sampled boxes' class logits (the
    boxes mapped into flipped views by the view's transform) and its adapted features mapped back by
    ``ViewTransform.inverse_feature_map`` image by image."""
    heads, out = model.teacher.roi_heads, []
    for v in range(len(batch[0]["teacher_views"])):
        feats = model.teacher.backbone(model._images([d["teacher_views"][v] for d in batch]).tensor)
        tfms = [d["teacher_transforms"][v] for d in batch]
        view_boxes = [t.apply_boxes(b) if t.hflip else b for t, b in zip(tfms, boxes)]
        logits = heads.box_predictor(heads.box_head(heads.box_pooler([feats[f] for f in heads.box_in_features],
                                                                     view_boxes)))[0]
        adapted = model.adaptors_teacher({f: feats[f] for f in model.mgd_features})
        back = {k: torch.cat([t.inverse_feature_map(x[i:i + 1], model.strides[k]) for i, t in enumerate(tfms)])
                for k, x in adapted.items()}
        out.append((feats, logits, back))
    return out


@pytest.mark.parametrize("switches", [PAPER, PLUS], ids=["paper", "plus"])
def test_batched_teacher_views_equal_the_per_view_loop(data, tmp_path, monkeypatch, switches):
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.merge_from_list(["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, *switches])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _batch(data)
    n_views, n_img = 4, 2
    loop = _run(model, batch, 1, monkeypatch)
    batched = _run(model, batch, 0, monkeypatch)

    # one backbone pass over the 4 views x 2 images (view-major) against 4 passes of 2 images
    assert [f["p2"].shape[0] for f in batched["backbone"]] == [n_views * n_img]
    assert [f["p2"].shape[0] for f in loop["backbone"]] == [n_img] * n_views
    for level, feat in batched["backbone"][0].items():
        torch.testing.assert_close(feat, torch.cat([f[level] for f in loop["backbone"]]))
    # fewer box-branch passes, the same rows
    assert len(batched["box_rows"]) < len(loop["box_rows"]) and sum(batched["box_rows"]) == sum(loop["box_rows"])

    # the sampled proposals' logits on every view, their mean and the sensitivities
    (z_b, mean_b, sens_b), (z_l, mean_l, sens_l) = batched["sensitivity"][0], loop["sensitivity"][0]
    assert z_b.shape[0] == n_views and z_b.shape == z_l.shape and z_b.shape[1] > 0
    torch.testing.assert_close(z_b, z_l)
    torch.testing.assert_close(mean_b, mean_l)
    torch.testing.assert_close(sens_b, sens_l)
    assert float(sens_b.max()) > 0  # the views do disagree: the sensitivities compared are not all zero

    # every unsupervised loss and logged count
    expected = {"loss_psm", "loss_mgd"} | ({"loss_mask_distill"} if "MODEL.MMT_PSM.MASK_DISTILL" in switches else set())
    assert set(batched["losses"]) == set(loop["losses"]) == expected
    for k in expected:
        torch.testing.assert_close(batched["losses"][k], loop["losses"][k])
    for k in ("loss_psm", "loss_mgd" if switches is PAPER else "loss_mask_distill"):
        assert float(batched["losses"][k]) > 0, k
    assert batched["logged"].keys() == loop["logged"].keys()
    for k, v in loop["logged"].items():
        assert batched["logged"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert batched["logged"]["mmt_psm/pseudo_labels_per_image"] > 0
    pairs = _run(model, batch, 2, monkeypatch)  # two views per pass: the same again
    assert [f["p2"].shape[0] for f in pairs["backbone"]] == [2 * n_img] * 2
    torch.testing.assert_close(pairs["sensitivity"][0][2], sens_l)
    for k in expected:
        torch.testing.assert_close(pairs["losses"][k], loop["losses"][k])

    # against the teacher's modules on each view alone
    reference = _per_view_reference(model, batch, batched["sampled"][0][0])
    for v, (feats, logits, adapted) in enumerate(reference):
        for level, feat in feats.items():
            torch.testing.assert_close(batched["backbone"][0][level][v * n_img:(v + 1) * n_img], feat)
        torch.testing.assert_close(z_b[v], logits, rtol=1e-5, atol=1e-5)  # fused: from the detection pass
        if switches is PAPER:
            assert len(batched["t_adapted"]) == n_views
            for level, x in adapted.items():
                torch.testing.assert_close(batched["t_adapted"][v][level], x)


def test_views_per_pass_comes_from_the_config(data, tmp_path):
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    assert build_model(cfg).views_per_pass == 0  # default: every view in one pass
    cfg.MODEL.MMT_PSM.TEACHER_VIEWS_PER_PASS = 2
    model = build_model(cfg)
    assert model.views_per_pass == 2 and model._view_passes(0, 4) == [(0, 2), (2, 4)]
    assert model._view_passes(1, 4) == [(1, 3), (3, 4)]
    cfg.MODEL.MMT_PSM.TEACHER_VIEWS_PER_PASS = -1
    with pytest.raises(ValueError, match="TEACHER_VIEWS_PER_PASS must be >= 0"):
        build_model(cfg)
