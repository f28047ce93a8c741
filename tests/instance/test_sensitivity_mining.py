"""Perturbation sensitivity of proposals and sensitivity-based negative mining."""
import math

import torch

from mmt_psm.instance.sensitivity_mining import mine_negatives, proposal_sensitivity


def test_identical_views_have_zero_sensitivity():
    z = torch.randn(5, 3)
    mean, s = proposal_sensitivity(z.expand(4, 5, 3))
    torch.testing.assert_close(mean, z)
    assert torch.all(s.abs() < 1e-6)


def test_two_view_case_by_hand():
    # Proposal 0: softmax [0.5, 0.5] and [0.75, 0.25]; proposal 1 identical views.
    views = torch.tensor([[[0.0, 0.0], [1.0, 2.0]], [[math.log(3.0), 0.0], [1.0, 2.0]]])
    mean, s = proposal_sensitivity(views)
    torch.testing.assert_close(mean, torch.tensor([[math.log(3.0) / 2, 0.0], [1.0, 2.0]]))
    # Unbiased std of two values a, b is |a - b| / sqrt(2); per class |a - b| = 0.25, two classes.
    torch.testing.assert_close(s, torch.tensor([2 * 0.25 / math.sqrt(2.0), 0.0]))
    _, s_biased = proposal_sensitivity(views, unbiased=False)
    torch.testing.assert_close(s_biased, torch.tensor([2 * 0.25 / 2, 0.0]))


def test_single_view_gives_zero_sensitivity():
    mean, s = proposal_sensitivity(torch.randn(1, 7, 3))
    assert mean.shape == (7, 3) and torch.equal(s, torch.zeros(7))


def test_mining_picks_top_half_positive_count():
    is_pos = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0, 1, 1], dtype=torch.bool)  # 5 positives -> 2 negatives
    sens = torch.tensor([9.0, 0.1, 9.0, 0.7, 0.3, 9.0, 0.9, 0.2, 9.0, 9.0])
    keep, w = mine_negatives(is_pos, sens)
    expected_neg = torch.zeros(10, dtype=torch.bool)
    expected_neg[[6, 3]] = True  # the two most sensitive negatives
    assert torch.equal(keep, is_pos | expected_neg)
    expected_w = is_pos.float() + 1.5 * expected_neg.float()
    torch.testing.assert_close(w, expected_w)
    # Other ratio / weight.
    keep, w = mine_negatives(is_pos, sens, ratio=0.6, negative_weight=2.0)  # floor(3.0) = 3 negatives
    assert keep.sum() == 8 and w[[1, 7]].eq(0).all() and w[[6, 3, 4]].eq(2.0).all()


def test_no_positive_keeps_nothing():
    keep, w = mine_negatives(torch.zeros(6, dtype=torch.bool), torch.rand(6))
    assert not keep.any() and torch.equal(w, torch.zeros(6))
    keep, w = mine_negatives(torch.zeros(0, dtype=torch.bool), torch.zeros(0))
    assert keep.shape == (0,) and w.shape == (0,)


def test_fewer_negatives_than_requested():
    is_pos = torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)  # wants 3 negatives, has 1
    keep, w = mine_negatives(is_pos, torch.rand(7))
    assert keep.all()
    torch.testing.assert_close(w, torch.tensor([1.0] * 6 + [1.5]))
    keep, _ = mine_negatives(torch.ones(4, dtype=torch.bool), torch.rand(4))
    assert keep.all()


def test_floor_of_odd_positive_count():
    is_pos = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)  # floor(3 / 2) = 1
    keep, _ = mine_negatives(is_pos, torch.tensor([0.0, 0.0, 0.0, 0.2, 0.5, 0.1]))
    assert keep.tolist() == [True, True, True, False, True, False]
