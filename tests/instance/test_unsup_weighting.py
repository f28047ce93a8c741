"""MMT-PSM unsupervised path, asserted: ramp x component weights, mining on/off, mask guidance on/off, views."""
import math

import pytest
import torch
from common import tiny_cfg, tiny_synthetic, unlabeled_view_batch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import mmt_psm.instance.mmt_psm_rcnn as rcnn
from mmt_psm.core.ramps import unsup_weight


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tiny_synthetic(str(tmp_path_factory.mktemp("uw")), prefix="uw", n_train=2, n_test=1, n_unlabeled=2)
    return "uw"


def _cfg(tmp_path, data, *opts):
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.merge_from_list(["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.MMT_PSM.STUDENT_BOX_DROPOUT", 0.0,
                         "MODEL.RPN.POST_NMS_TOPK_TRAIN", 100, "MODEL.MMT_PSM.NUM_TEACHER_COPIES", 1, *opts])
    return cfg


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg)


def _record(monkeypatch, name):
    """Wrap ``mmt_psm_rcnn.<name>`` so each call's (args, kwargs, result) is kept (the result is unchanged)."""
    calls, fn = [], getattr(rcnn, name)

    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(rcnn, name, wrapper)
    return calls


# burn-in 2, ramp-up 4, ramp-down 4 of 20 iterations, base 3: hand-computed w(t)
@pytest.mark.parametrize("it,w", [
    (3, 3.0 * math.exp(-5 * (1 - 1 / 4) ** 2)),  # ramp-up: 1 iteration after burn-in
    (17, 3.0 * math.exp(-12 * (1 - 3 / 4) ** 2)),  # ramp-down: 3 iterations left
])
def test_losses_are_ramp_weight_times_component_weight_times_raw(data, tmp_path, it, w):
    cfg = _cfg(tmp_path, data, "SEMI.BURN_IN_ITERS", 2, "SEMI.RAMP_UP_ITERS", 4, "SEMI.RAMP_DOWN_ITERS", 4,
               "SOLVER.MAX_ITER", 20, "SEMI.UNSUP_WEIGHT", 3.0, "MODEL.MMT_PSM.PSM_WEIGHT", 0.2,
               "MODEL.MMT_PSM.MGD_WEIGHT", 0.7)
    assert unsup_weight(it, 2, 4, 4, 20, 3.0) == pytest.approx(w, rel=1e-12)
    model = _model(cfg)
    batch = unlabeled_view_batch(cfg, f"{data}_unlabeled", 2)
    with EventStorage(start_iter=it) as storage:
        torch.manual_seed(1)  # proposal sampling draws from torch's RNG: same draws for both calls
        losses = model(batch)
        torch.manual_seed(1)
        raw = model.unsupervised_losses(batch)
    assert storage.latest()["mmt_psm/unsup_weight"][0] == pytest.approx(w, rel=1e-12)
    assert float(raw["loss_psm"]) > 0 and float(raw["loss_mgd"]) > 0
    assert float(losses["loss_psm"]) == pytest.approx(w * 0.2 * float(raw["loss_psm"]), rel=1e-6)
    assert float(losses["loss_mgd"]) == pytest.approx(w * 0.7 * float(raw["loss_mgd"]), rel=1e-6)
    assert set(losses) == {"loss_psm", "loss_mgd"}  # no labeled image in the batch: no supervised loss


def test_mining_off_keeps_every_sampled_proposal_at_weight_one(data, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, data, "MODEL.MMT_PSM.MINING", False)
    model = _model(cfg)
    sampled, psm = _record(monkeypatch, "label_and_sample"), _record(monkeypatch, "mined_semantic_distillation_loss")
    with EventStorage(start_iter=10):
        out = model.unsupervised_losses(unlabeled_view_batch(cfg, f"{data}_unlabeled", 2))
    boxes, labels = sampled[0][2][:2]
    n_sampled = sum(len(b) for b in boxes)
    assert sum(int((lab != 2).sum()) for lab in labels) > 0  # positives and negatives both present
    weights = psm[0][0][2]
    assert n_sampled > 0 and weights.shape == (n_sampled,)
    assert torch.equal(weights, torch.ones(n_sampled))
    # the loss is the plain mean of the per-proposal soft CE over all sampled proposals / (C+1)
    s_logits, t_logits = psm[0][0][0], psm[0][0][1]
    q = torch.softmax(t_logits / 0.5, dim=-1)
    hand = -(q * torch.log_softmax(s_logits.detach(), dim=-1)).sum(-1).mean() / 3
    assert float(out["loss_psm"]) == pytest.approx(float(hand), rel=1e-5)


def test_mining_on_keeps_positives_and_half_as_many_sensitive_negatives(data, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, data, "MODEL.MMT_PSM.NUM_TEACHER_COPIES", 2)
    model = _model(cfg)
    psm = _record(monkeypatch, "mined_semantic_distillation_loss")
    with EventStorage(start_iter=10) as storage:
        model.unsupervised_losses(unlabeled_view_batch(cfg, f"{data}_unlabeled", 2))
    weights = psm[0][0][2]
    n_pos, n_mined = int((weights == 1).sum()), int((weights == 1.5).sum())
    assert set(weights.unique().tolist()) <= {0.0, 1.0, 1.5}
    assert n_pos > 0 and n_mined == min(n_pos // 2, int((weights != 1).sum()))
    assert storage.latest()["mmt_psm/positives_per_image"][0] == n_pos / 2
    assert storage.latest()["mmt_psm/mined_negatives_per_image"][0] == n_mined / 2


@pytest.mark.parametrize("use_mask", [True, False])
def test_mgd_without_mask_is_nonzero_where_the_foreground_is_empty(data, tmp_path, monkeypatch, use_mask):
    cfg = _cfg(tmp_path, data, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 1.01, "MODEL.MMT_PSM.MGD_USE_MASK", use_mask)
    model = _model(cfg)
    mgd = _record(monkeypatch, "mask_guided_feature_loss")
    with EventStorage(start_iter=10):
        out = model.unsupervised_losses(unlabeled_view_batch(cfg, f"{data}_unlabeled", 2))
    (_, _, fg), kwargs = mgd[0][0][:3], mgd[0][1]
    assert float(fg.sum()) == 0.0 and kwargs["use_mask"] is use_mask
    assert float(out["loss_psm"]) == 0.0  # no pseudo-label: no positive, so no mined negative either
    if use_mask:
        assert float(out["loss_mgd"]) == 0.0
    else:  # teacher views: copy 0 and its flip -> two calls, mean of per-level mean squared differences
        hand = torch.stack([
            torch.stack([(s.detach() - t).pow(2).mean() for s, t in zip(a[0].values(), a[1].values())]).mean()
            for a, _, _ in mgd
        ]).mean()
        assert len(mgd) == 2 and float(hand) > 0
        assert float(out["loss_mgd"]) == pytest.approx(float(hand), rel=1e-5)


def test_mining_with_a_single_teacher_view_is_rejected(data, tmp_path):
    cfg = _cfg(tmp_path, data, "MODEL.MMT_PSM.TEACHER_FLIP", False)  # K=1, no flip: one view, no sensitivity
    with pytest.raises(ValueError, match="MINING needs >= 2 teacher views"):
        build_model(cfg)
    cfg.MODEL.MMT_PSM.MINING = False
    model = build_model(cfg)  # plain Mean Teacher is fine
    model.mining = True  # a model built without the config check still refuses at the step
    with EventStorage(start_iter=10), pytest.raises(ValueError, match="MINING needs >= 2 teacher views"):
        model.unsupervised_losses(unlabeled_view_batch(cfg, f"{data}_unlabeled", 1))
