"""The semantic siblings' per-pixel terms against their formulas and hand computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmt_psm.networks.unet import soft_dice_loss, supervised_ce
from mmt_psm.semantic.losses import (
    class_feature_means,
    class_separation_loss,
    entropy_map,
    kl_map,
    low_confidence_mask,
    masked_mean,
    masked_softmax_mse,
    update_prototypes,
    valid_mask,
)


def test_kl_is_zero_for_agreeing_heads_and_matches_formula():
    x = torch.randn(2, 4, 3, 5)
    assert kl_map(x, x).abs().max() < 1e-6
    t = torch.tensor([[[[math.log(0.75)]], [[math.log(0.25)]]]])  # p = (0.75, 0.25)
    s = torch.tensor([[[[math.log(0.5)]], [[math.log(0.5)]]]])  # q = (0.5, 0.5)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_map(t, s).item() == pytest.approx(expected, abs=1e-6)


def test_kl_target_is_detached():
    t = torch.randn(1, 3, 2, 2, requires_grad=True)
    s = torch.randn(1, 3, 2, 2, requires_grad=True)
    kl_map(t, s).sum().backward()
    assert t.grad is None and s.grad is not None


def test_entropy_zero_when_confident_and_log_c_when_uniform():
    confident = torch.zeros(1, 4, 2, 2)
    confident[:, 2] = 100.0
    assert entropy_map(confident).abs().max() < 1e-6
    assert entropy_map(torch.zeros(1, 4, 2, 2)) == pytest.approx(torch.full((1, 2, 2), math.log(4)))


def test_masked_mean_zero_and_connected_when_empty():
    v = torch.randn(2, 3, 3, requires_grad=True)
    out = masked_mean(v, torch.zeros(2, 3, 3, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(v.grad, torch.zeros_like(v))
    m = torch.zeros(2, 3, 3, dtype=torch.bool)
    m[0, 0, 0] = m[1, 2, 2] = True
    assert masked_mean(v, m).item() == pytest.approx(((v[0, 0, 0] + v[1, 2, 2]) / 2).item())


def test_low_confidence_mask_and_masked_mse_by_hand():
    probs = torch.tensor([[0.95, 0.5], [0.05, 0.5]]).view(1, 2, 1, 2)  # pixel 0 confident, pixel 1 not
    low, pseudo = low_confidence_mask(probs, tau=0.9)
    assert low.tolist() == [[[False, True]]] and pseudo.tolist() == [[[0, 0]]]
    student = torch.tensor([[0.6, 0.7], [0.4, 0.3]]).view(1, 2, 1, 2)
    # kept pixel 1: mean over 2 classes of (0.7-0.5)^2 and (0.3-0.5)^2 = 0.04
    assert masked_softmax_mse(student, probs, low).item() == pytest.approx(0.04)
    every = torch.ones_like(low)
    assert masked_softmax_mse(student, probs, every).item() == pytest.approx(((student - probs) ** 2).mean().item())
    # LOSS_NORM "all": the kept pixel's 0.04 divided over both pixels, as Mean Teacher's all-pixel mean weighs it
    assert masked_softmax_mse(student, probs, low, over=every).item() == pytest.approx(0.02)


def test_prototype_update_by_hand():
    feats = torch.tensor([[1.0, 3.0, 5.0, 0.0], [2.0, 2.0, 2.0, 0.0]]).view(1, 2, 1, 4)  # D=2, 4 pixels
    labels = torch.tensor([[[0, 0, 1, 255]]])
    sums, counts = class_feature_means(feats, labels, num_classes=3, ignore_value=255)
    assert counts.tolist() == [2, 1, 0]
    assert sums.tolist() == [[4.0, 4.0], [5.0, 2.0], [0.0, 0.0]]
    protos, init = torch.zeros(3, 2), torch.zeros(3, dtype=torch.bool)
    update_prototypes(protos, init, sums, counts, momentum=0.9)
    assert protos.tolist() == [[2.0, 2.0], [5.0, 2.0], [0.0, 0.0]] and init.tolist() == [True, True, False]
    update_prototypes(protos, init, torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]),
                      torch.tensor([1.0, 0.0, 1.0]), momentum=0.9)
    assert protos[0].tolist() == pytest.approx([1.8, 1.8])  # 0.9 * 2 + 0.1 * 0
    assert protos[1].tolist() == [5.0, 2.0]  # not seen: unchanged
    assert protos[2].tolist() == [1.0, 1.0]  # first sight: set


def test_class_separation_loss_by_hand():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feats = torch.tensor([[2.0], [0.0]]).view(1, 2, 1, 1)  # along prototype 0
    pseudo = torch.tensor([[[0]]])
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0)))
    assert class_separation_loss(feats, pseudo, mask, protos, t).item() == pytest.approx(expected, rel=1e-5)
    # a pixel whose pseudo-class has no prototype yet is left out: loss 0
    init = torch.tensor([False, True])
    assert class_separation_loss(feats, pseudo, mask, protos, t, init).item() == 0.0
    # over a 4-pixel image in which only this pixel is kept: the same sum divided by 4
    feats4 = torch.cat([feats, torch.zeros(1, 2, 1, 3)], dim=3)
    pseudo4, mask4 = torch.zeros(1, 1, 4, dtype=torch.long), torch.tensor([[[True, False, False, False]]])
    assert class_separation_loss(feats4, pseudo4, mask4, protos, t).item() == pytest.approx(expected, rel=1e-5)
    out = class_separation_loss(feats4, pseudo4, mask4, protos, t, over=torch.ones_like(mask4))
    assert out.item() == pytest.approx(expected / 4, rel=1e-5)


def test_valid_mask_marks_padding():
    m = valid_mask([(2, 3), (4, 1)], (4, 3))
    assert m.sum().item() == 6 + 4 and not m[0, 2:].any() and not m[1, :, 1:].any()


def test_supervised_ce_ignores_and_is_zero_without_labels():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    t = torch.tensor([[[0, 255], [2, 255]]])
    ref = F.cross_entropy(logits[..., [0, 1], [0, 0]], t[..., [0, 1], [0, 0]])
    assert supervised_ce(logits, t, 255).item() == pytest.approx(ref.item())
    none = supervised_ce(logits, torch.full_like(t, 255), 255)
    assert none.item() == 0.0 and none.requires_grad


def test_soft_dice_loss_perfect_and_hand_case():
    t = torch.tensor([[[0, 1], [1, 1]]])
    perfect = F.one_hot(t, 2).permute(0, 3, 1, 2).float() * 100
    assert soft_dice_loss(perfect, t, 255).item() == pytest.approx(0.0, abs=1e-4)
    uniform = torch.zeros(1, 2, 2, 2)  # p = 0.5 everywhere
    # class 0: (2*0.5 + e)/(1 + 1 + e); class 1: (2*1.5 + e)/(1 + 3 + e)
    expected = 1 - (1.0 / 2.0 + 3.0 / 4.0) / 2
    assert soft_dice_loss(uniform, t, 255).item() == pytest.approx(expected, abs=1e-4)


# fp16 (AMP) inputs: class pixel counts and feature sums over a batch exceed fp16's 65504 (4 x 256 x 256 pixels of
# one class here); the losses and prototype statistics are computed in fp32 and equal the fp32 computation.
def test_soft_dice_loss_of_fp16_logits_is_the_fp32_one():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 2, 256, 256, generator=g) + torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)).half()
    t = torch.zeros(4, 256, 256, dtype=torch.long)  # all one class: 262144 pixels
    full = soft_dice_loss(logits.float(), t, 255)
    with torch.autocast("cpu", dtype=torch.float16):
        amp = soft_dice_loss(logits, t, 255)
    for half in (soft_dice_loss(logits, t, 255), amp):
        assert half.dtype == torch.float32 and torch.isfinite(half)
        assert half.item() == pytest.approx(full.item(), rel=1e-5)
    ce = supervised_ce(logits, t, 255)  # the CE summed over 262144 pixels, divided by their count
    assert ce.dtype == torch.float32
    assert ce.item() == pytest.approx(supervised_ce(logits.float(), t, 255).item(), rel=1e-5)


def test_prototype_statistics_and_masked_mean_of_fp16_features_are_fp32():
    g = torch.Generator().manual_seed(0)
    feats = (torch.rand(4, 3, 256, 256, generator=g) + 1.0).half()
    labels = torch.zeros(4, 256, 256, dtype=torch.long)
    labels[0, :8] = 1
    with torch.autocast("cpu", dtype=torch.float16):  # as in an AMP step: autocast would run the matmul in fp16
        sums, counts = class_feature_means(feats, labels, num_classes=3, ignore_value=255)
    ref_sums, ref_counts = class_feature_means(feats.float(), labels, num_classes=3, ignore_value=255)
    assert sums.dtype == counts.dtype == torch.float32 and torch.isfinite(sums).all()
    assert counts.tolist() == ref_counts.tolist() == [4 * 256 * 256 - 8 * 256, 8 * 256, 0]
    assert torch.allclose(sums, ref_sums, rtol=1e-5)
    values = torch.ones(4, 256, 256, dtype=torch.float16)
    mean = masked_mean(values, torch.ones(4, 256, 256, dtype=torch.bool))
    assert mean.dtype == torch.float32 and mean.item() == 1.0
