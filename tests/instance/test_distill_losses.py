"""loss_psm and loss_mgd against hand computations, and their behaviour when nothing is kept / masked."""
import math

import pytest
import torch

from mmt_psm.instance.distillation import (
    FeatureAdaptors,
    mask_guided_feature_loss,
    mined_semantic_distillation_loss,
    sharpen,
)


def test_sharpen():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    torch.testing.assert_close(sharpen(p, 0.5), torch.tensor([[0.25, 0.0625, 0.0625]]) / 0.375)
    torch.testing.assert_close(sharpen(p, 1.0), p)
    z = torch.randn(4, 3)
    torch.testing.assert_close(sharpen(torch.softmax(z, -1), 0.5), torch.softmax(z / 0.5, -1))


def _hand_ce(q, s_logits):
    e = [math.exp(v) for v in s_logits]
    return -sum(qi * math.log(ei / sum(e)) for qi, ei in zip(q, e))


def _hand_q(z, T):
    p = [math.exp(v) for v in z]
    p = [v / sum(p) for v in p]
    pt = [v ** (1 / T) for v in p]
    return [v / sum(pt) for v in pt]


def test_psm_loss_by_hand():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.3, 0.1], [5.0, -3.0, 2.0]], requires_grad=True)
    z = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    w = torch.tensor([1.0, 1.5, 0.0])  # one positive, one mined negative, one dropped
    loss = mined_semantic_distillation_loss(s, z, w, T=0.5)
    ce = [_hand_ce(_hand_q(z[i].tolist(), 0.5), s[i].tolist()) for i in range(3)]
    expected = (1.0 * ce[0] + 1.5 * ce[1]) / 2 / 3  # / #kept / (C + 1)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    loss.backward()
    assert torch.equal(s.grad[2], torch.zeros(3))  # dropped proposal gets no gradient
    assert s.grad[:2].abs().sum() > 0


def test_psm_loss_zero_when_nothing_kept():
    s = torch.randn(4, 3, requires_grad=True)
    loss = mined_semantic_distillation_loss(s, torch.randn(4, 3), torch.zeros(4))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros(4, 3))
    empty = torch.zeros(0, 3, requires_grad=True)
    loss = mined_semantic_distillation_loss(empty, torch.zeros(0, 3), torch.zeros(0))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def _feats(seed, shape=(2, 4, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    return {"p2": torch.randn(shape, generator=g), "p3": torch.randn(shape[:2] + (8, 8), generator=g)}


def test_mgd_empty_mask_is_zero_with_grad():
    fs = {k: v.requires_grad_() for k, v in _feats(0).items()}
    loss = mask_guided_feature_loss(fs, _feats(1), torch.zeros(2, 1, 64, 64))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_mgd_only_sees_foreground():
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, :32, :32] = 1.0  # top-left quarter: p2 (stride 4) rows/cols < 8, p3 (stride 8) < 4
    ft = _feats(1)
    fs = {k: v.clone() for k, v in ft.items()}
    assert mask_guided_feature_loss(fs, ft, mask).item() == 0.0
    fs["p2"][:, :, 8:, :] += 3.0  # outside the mask
    fs["p3"][:, :, :, 4:] -= 1.0
    assert mask_guided_feature_loss(fs, ft, mask).item() == 0.0
    fs["p2"][:, :, :8, :8] += 2.0  # inside: (2^2 * area * C) / (area * C) = 4 on p2, 0 on p3
    torch.testing.assert_close(mask_guided_feature_loss(fs, ft, mask), torch.tensor(4.0 / 2))
    # Without the mask every location counts: plain mean square per level, mean over levels.
    expected = torch.stack([(fs[k] - ft[k]).pow(2).mean() for k in ("p2", "p3")]).mean()
    torch.testing.assert_close(mask_guided_feature_loss(fs, ft, None, use_mask=False), expected)


def test_mgd_formula_and_threshold():
    # A mask covering 3/4 of each 2x2 block pools to 0.75 > 0.5 -> full level mask; 1/4 -> 0.25 -> empty.
    mask = torch.zeros(1, 1, 4, 4)
    mask[:, :, :2, :2] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    mask[:, :, 2:, 2:] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    fs = {"p": torch.arange(8.0).view(1, 2, 2, 2)}
    ft = {"p": torch.zeros(1, 2, 2, 2)}
    loss = mask_guided_feature_loss(fs, ft, mask)
    # Only level cell (0, 0): values 0 (channel 0) and 4 (channel 1); sum sq 16 / (1 * C=2 + 1e-7).
    torch.testing.assert_close(loss, torch.tensor(16.0 / (2 + 1e-7)))


def test_mgd_teacher_detached():
    fs = {k: v.requires_grad_() for k, v in _feats(0).items()}
    ft = {k: v.requires_grad_() for k, v in _feats(1).items()}
    mask_guided_feature_loss(fs, ft, torch.ones(2, 64, 64)).backward()
    assert fs["p2"].grad is not None and ft["p2"].grad is None


def test_feature_adaptors():
    ad = FeatureAdaptors(["p2", "p3"], 4, 2)
    out = ad(_feats(0))
    assert set(out) == {"p2", "p3"} and out["p2"].shape == (2, 2, 16, 16) and out["p3"].shape == (2, 2, 8, 8)
    assert all(torch.equal(m.bias, torch.zeros(2)) for m in ad.adaptors.values())
    assert FeatureAdaptors(["p2"]).adaptors["p2"].weight.shape == (128, 256, 1, 1)


def test_mgd_of_fp16_features_is_the_fp32_loss():
    """AMP: adapted features arrive in fp16; the squared distances summed over a batch exceed fp16's 65504
    (4 x 16 x 64 x 64 values of 8^2 here); the loss is summed in fp32 and equals the fp32 one."""
    g = torch.Generator().manual_seed(0)
    ft = torch.randn(4, 16, 64, 64, generator=g).half()
    fs = (ft.float() + 8.0).half()
    mask = torch.ones(4, 1, 256, 256, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        half = mask_guided_feature_loss({"p2": fs}, {"p2": ft}, mask)
    full = mask_guided_feature_loss({"p2": fs.float()}, {"p2": ft.float()}, mask.float())
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert half.item() == pytest.approx(full.item(), rel=1e-5) and half.item() == pytest.approx(64.0, rel=1e-2)
    plain = mask_guided_feature_loss({"p2": fs}, {"p2": ft}, None, use_mask=False)
    assert torch.isfinite(plain) and plain.item() == pytest.approx(full.item(), rel=1e-2)
