"""Hand-computed checks of AJI, object F1, Dice and pixel IoU on tiny (possibly overlapping) masks."""
import numpy as np
import pytest

from mmt_psm.core.object_metrics import (
    aggregated_jaccard_index,
    aji_counts,
    class_counts,
    dice,
    f1_from_counts,
    iou_matrix,
    object_f1,
    pairwise_intersections,
    pixel_iou,
)


def box(shape, r0, r1, c0, c1):
    """Mask with rows r0..r1-1 and columns c0..c1-1 set."""
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def flat_range(start, stop, shape=(6, 6)):
    """Mask with the row-major pixels start..stop-1 set."""
    m = np.zeros(shape[0] * shape[1], dtype=bool)
    m[start:stop] = True
    return m.reshape(shape)


S4 = (4, 4)
# Overlapping GT on 4x4: A = rows 0-1, cols 0-1 (4 px); B = rows 0-1, cols 1-2 (4 px); A & B = col 1 (2 px).
GT_A, GT_B = box(S4, 0, 2, 0, 2), box(S4, 0, 2, 1, 3)
# Predictions: P1 = A exactly; P2 = rows 0-1, cols 1-3 (6 px, contains B); P3 = row 3 (4 px, touches nothing).
P1, P2, P3 = box(S4, 0, 2, 0, 2), box(S4, 0, 2, 1, 4), box(S4, 3, 4, 0, 4)


def test_iou_matrix_by_hand():
    # IoU(A,P1) = 4/4; IoU(A,P2) = 2/(4+6-2) = 1/4; IoU(B,P1) = 2/(4+4-2) = 1/3; IoU(B,P2) = 4/6; P3 -> 0.
    expected = np.array([[1.0, 0.25, 0.0], [1 / 3, 2 / 3, 0.0]])
    np.testing.assert_allclose(iou_matrix([GT_A, GT_B], [P1, P2, P3]), expected)


def test_aji_overlapping_gt_by_hand():
    # A -> P1: C += 4, U += 4.  B -> P2: C += 4, U += 6.  P3 never chosen: U += 4.  AJI = 8 / 14.
    assert aji_counts([GT_A, GT_B], [P1, P2, P3]) == (8, 14)
    assert aggregated_jaccard_index([GT_A, GT_B], [P1, P2, P3]) == pytest.approx(8 / 14)
    # Without P3: 8 / 10.
    assert aggregated_jaccard_index(np.stack([GT_A, GT_B]), np.stack([P1, P2])) == pytest.approx(0.8)


def test_unmatched_predictions_lower_aji_by_exactly_their_area():
    c, u = aji_counts([GT_A, GT_B], [P1, P2])
    extra = box(S4, 2, 4, 0, 2)  # 4 px; overlaps no GT, so it is never chosen
    extra2 = box(S4, 3, 4, 3, 4)  # 1 px
    assert aji_counts([GT_A, GT_B], [P1, P2, extra]) == (c, u + 4)
    assert aji_counts([GT_A, GT_B], [P1, extra2, P2, extra]) == (c, u + 5)


def test_gt_without_overlapping_prediction_adds_its_area():
    # GT A and a far GT C = row 3 (4 px); only P1 = A predicted. A -> P1 (4/4); C touches nothing: U += 4.
    gt_c = box(S4, 3, 4, 0, 4)
    assert aji_counts([GT_A, gt_c], [P1]) == (4, 8)
    assert aggregated_jaccard_index([GT_A, gt_c], [P1]) == pytest.approx(0.5)


def test_prediction_chosen_by_two_gts_counts_twice_and_iou_half_is_not_a_match():
    s = (1, 4)
    g1, g2 = box(s, 0, 1, 0, 2), box(s, 0, 1, 2, 4)  # 2 px each, disjoint
    p = box(s, 0, 1, 0, 4)  # 4 px; IoU 0.5 with each GT
    # Both GTs choose p: C = 2 + 2, U = 4 + 4 -> AJI 0.5.
    assert aji_counts([g1, g2], [p]) == (4, 8)
    # IoU must be strictly > 0.5: no match -> tp 0, fp 1, fn 2.
    assert object_f1([g1, g2], [p]) == (0.0, 0.0, 0.0, 0, 1, 2)


def test_object_f1_by_hand():
    # A-P1 (IoU 1) and B-P2 (IoU 2/3) match; P3 is a false positive. P = 2/3, R = 1, F1 = 2*2/(4+1) = 0.8.
    p, r, f1, tp, fp, fn = object_f1([GT_A, GT_B], [P1, P2, P3])
    assert (tp, fp, fn) == (2, 1, 0)
    assert (p, r, f1) == pytest.approx((2 / 3, 1.0, 0.8))


def test_object_f1_uses_maximum_matching_not_greedy():
    # On 6x6 (row-major pixel ranges): GT1 = 0..9 (10 px) inside GT2 = 0..11 (12 px).
    # P1 = 0..10: IoU(GT1) = 10/11, IoU(GT2) = 11/12. P2 = 3..14: IoU(GT2) = 9/15 = 0.6, IoU(GT1) = 7/15.
    # Greedy by highest IoU pairs GT2-P1 first and leaves GT1 unmatched; the best matching is GT1-P1, GT2-P2.
    g1, g2 = flat_range(0, 10), flat_range(0, 12)
    p1, p2 = flat_range(0, 11), flat_range(3, 15)
    res = object_f1([g1, g2], [p1, p2])
    assert (res.tp, res.fp, res.fn) == (2, 0, 0)
    assert res.f1 == 1.0
    # AJI: both GTs choose P1: C = 10 + 11, U = 11 + 12; P2 unused: U += 12 -> 21 / 35.
    assert aji_counts([g1, g2], [p1, p2]) == (21, 35)


def test_dice_and_pixel_iou_of_unions_by_hand():
    # GT union = rows 0-1, cols 0-2 (6 px); pred union = rows 0-1 all (8) + row 3 (4) = 12 px; overlap 6.
    # Dice = 2*6 / (6 + 12) = 2/3; IoU = 6 / 12 = 0.5.
    assert dice([GT_A, GT_B], [P1, P2, P3]) == pytest.approx(2 / 3)
    assert pixel_iou([GT_A, GT_B], [P1, P2, P3]) == pytest.approx(0.5)


def test_perfect_prediction_scores_one():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 6, 6)) > 0.5
    assert aggregated_jaccard_index(masks, masks.copy()) == 1.0
    assert object_f1(masks, masks.copy()) == (1.0, 1.0, 1.0, 5, 0, 0)
    assert dice(masks, masks) == 1.0
    assert pixel_iou(masks, masks) == 1.0


def test_empty_prediction_scores_zero():
    gt = [GT_A, GT_B]
    assert aggregated_jaccard_index(gt, []) == 0.0
    assert aji_counts(gt, []) == (0, 8)  # every GT unpaired: U = |A| + |B| = 4 + 4 (overlap counted per GT)
    assert object_f1(gt, []) == (0.0, 0.0, 0.0, 0, 0, 2)
    assert dice(gt, []) == 0.0
    assert pixel_iou(gt, np.zeros((0, 4, 4), bool)) == 0.0


def test_empty_cases_convention():
    # No GT and no prediction: 1.0 everywhere (nothing to find, nothing found).
    assert aggregated_jaccard_index([], []) == 1.0
    assert object_f1([], []) == (1.0, 1.0, 1.0, 0, 0, 0)
    assert dice([], []) == 1.0 and pixel_iou([], []) == 1.0
    # No GT but predictions: 0.
    assert aggregated_jaccard_index([], [P1]) == 0.0
    assert aji_counts([], [P1, P3]) == (0, 8)
    assert object_f1([], [P1]) == (0.0, 0.0, 0.0, 0, 1, 0)
    assert dice([], [P1]) == 0.0


def test_f1_from_summed_counts():
    assert f1_from_counts(3, 1, 2) == pytest.approx((0.75, 0.6, 6 / 9, 3, 1, 2))


def test_intersections_match_brute_force():
    rng = np.random.default_rng(1)
    gt, pred = rng.random((4, 7, 5)) > 0.6, rng.random((3, 7, 5)) > 0.4
    inter, ga, pa = pairwise_intersections(gt, pred)
    brute = np.array([[np.sum(g & p) for p in pred] for g in gt])
    np.testing.assert_array_equal(inter, brute)
    np.testing.assert_array_equal(ga, gt.sum((1, 2)))
    np.testing.assert_array_equal(pa, pred.sum((1, 2)))


@pytest.mark.parametrize("n_gt,n_pred", [(5, 4), (0, 3), (4, 0), (0, 0)])
def test_class_counts_equals_the_four_metrics(n_gt, n_pred):
    """The one-pass evaluator path gives exactly what the four separate metrics give, empty cases included."""
    rng = np.random.default_rng(n_gt * 10 + n_pred)
    gt = [flat_range(s, s + rng.integers(3, 12)) for s in rng.integers(0, 24, n_gt)]
    pred = [flat_range(s, s + rng.integers(3, 12)) for s in rng.integers(0, 24, n_pred)]
    got = class_counts(gt, pred)
    f1 = object_f1(gt, pred)
    assert (got.aji_c, got.aji_u) == aji_counts(gt, pred)
    assert (got.tp, got.fp, got.fn) == (f1.tp, f1.fp, f1.fn)
    assert got.dice == dice(gt, pred) and got.iou == pixel_iou(gt, pred)
    if n_gt and n_pred:
        assert 0 < got.aji_c < got.aji_u


def test_class_counts_by_hand():
    """GT {A, B} vs predictions {P1, P2, P3} of the 4x4 case: C = 4 + 4, U = 4 + 6 + 4 (P3 unpaired)."""
    got = class_counts([GT_A, GT_B], [P1, P2, P3])
    assert (got.aji_c, got.aji_u) == (8, 14)
    assert (got.tp, got.fp, got.fn) == (2, 1, 0)
    # unions: GT 6 px (rows 0-1, cols 0-2), pred 12 px; overlap 6 px
    assert got.dice == pytest.approx(12 / 18) and got.iou == pytest.approx(6 / 12)


def test_size_mismatch_raises():
    with pytest.raises(ValueError):
        iou_matrix([GT_A], [np.zeros((5, 5), bool)])


@pytest.mark.slow
def test_sixty_objects_on_1024():
    """A realistic size (60 discs per 1024 x 1024 image) runs and gives consistent figures (no wall-clock bound:
    timings on shared CI machines are noise; BENCHMARKS.md holds the measured speed)."""
    yy, xx = np.mgrid[:1024, :1024]
    rng = np.random.default_rng(2)

    def discs(n):
        c = rng.uniform(0, 1024, (n, 2))
        r = rng.uniform(20, 80, n)
        return np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 < rr**2 for (cy, cx), rr in zip(c, r)])

    gt, pred = discs(60), discs(60)
    c, u = aji_counts(gt, pred)
    f1 = object_f1(gt, pred)
    assert 0 < c < u and f1.tp + f1.fn == 60 and f1.tp + f1.fp == 60
    assert 0 < dice(gt, pred) < 1
    assert aji_counts(gt, gt)[0] == aji_counts(gt, gt)[1] and object_f1(gt, gt).tp == 60
