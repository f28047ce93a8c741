"""Cell instance metrics on (possibly overlapping) boolean masks: AJI, object F1, pixel Dice and IoU.

Pure numpy/scipy, one class and one image at a time. Masks of a class are given as an (N, H, W) boolean
array or a sequence of N (H, W) boolean arrays; instances may overlap (amodal cytoplasm in overlapping-cell
data), so no label map is ever formed. Pairwise intersections are one sparse matrix product over foreground
pixels only: 60 objects on 1024x1024 take about 0.05 s on one CPU core.

Conventions (documented here once, tested in ``tests/core/test_cell_metrics.py``):

* Empty cases: a score whose denominator is zero is 1.0 when there is no GT AND no prediction (nothing to
  find, nothing found) and 0.0 otherwise. So AJI/F1/Dice/IoU of (no GT, no pred) = 1.0; (no GT, some pred)
  = 0.0; (some GT, no pred) = 0.0. For AJI/Dice/IoU "no" means no foreground pixels (zero-area masks count as
  none), for F1 no objects. Pooled aggregation (sum of ``aji_counts`` C / sum of U, summed tp/fp/fn) is
  unaffected: an image with nothing in it adds zero to every sum; a mean of per-image scores (the MoNuSeg
  AJI) counts such an image as 1.0.
* AJI (Kumar et al., IEEE TMI 2017), generalised to overlapping masks and following the HoVer-Net
  ``get_fast_aji`` convention: each GT G_i is paired with the prediction S_j of maximal IoU (ties: lowest j);
  if that IoU is > 0, C += |G_i & S_j| and U += |G_i | S_j|; if no prediction touches G_i, U += |G_i|.
  Every prediction never paired adds |S_j| to U. A prediction paired with several GTs is counted for each of
  them (as in the original definition). AJI = C / U.
* Object F1: one-to-one matching of GT and predictions with IoU > ``iou_thresh`` (strict). With overlapping
  masks a prediction can exceed 0.5 IoU with two GTs, so the matching is a maximum-cardinality assignment
  (Hungarian), ties broken by larger total IoU, not a greedy pass.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment

__all__ = [
    "Masks",
    "F1Result",
    "pairwise_intersections",
    "iou_matrix",
    "aji_counts",
    "aggregated_jaccard_index",
    "match_objects",
    "object_f1",
    "f1_from_counts",
    "dice",
    "pixel_iou",
    "ClassCounts",
    "class_counts",
]

Masks = Union[np.ndarray, Sequence[np.ndarray]]


class F1Result(NamedTuple):
    """Object-level scores at an IoU threshold; a tuple: ``p, r, f1, tp, fp, fn = object_f1(...)``."""

    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int


def _ratio(num: float, den: float, empty: bool) -> float:
    """num/den; for den == 0: 1.0 if the whole comparison is empty (no GT, no pred), else 0.0."""
    if den > 0:
        return float(num) / float(den)
    return 1.0 if empty else 0.0


def _flat(masks: Masks) -> Optional[np.ndarray]:
    """(N, H*W) bool view of a mask stack, or None when there are no masks."""
    if len(masks) == 0:
        return None
    arr = np.asarray(masks if isinstance(masks, np.ndarray) else np.stack(list(masks)))
    if arr.ndim != 3:
        raise ValueError(f"expected masks of shape (N, H, W), got {arr.shape}")
    return arr.reshape(arr.shape[0], -1).astype(bool, copy=False)


def _check_same_size(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> None:
    if a is not None and b is not None and a.shape[1] != b.shape[1]:
        raise ValueError(f"GT and predicted masks differ in image size ({a.shape[1]} vs {b.shape[1]} pixels)")


def _to_sparse(flat: np.ndarray) -> sparse.csr_matrix:
    """(N, H*W) bool -> CSR of ones; its row lengths are the mask areas.

    One ``flatnonzero`` pass (row-major, so each row's columns come sorted) instead of 2-D ``nonzero``, which
    is ~7x slower on a stack of a thousand 1000 x 1000 masks."""
    n, width = flat.shape
    rows, cols = np.divmod(np.flatnonzero(flat), width)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return sparse.csr_matrix((np.ones(cols.size, dtype=np.int64), cols, indptr), shape=flat.shape)


def pairwise_intersections(gt: Masks, pred: Masks) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact pixel counts: ``inter`` (G, P) int64, ``gt_area`` (G,), ``pred_area`` (P,).

    Computed as a sparse product over foreground pixels, so cost scales with object area, not image area.
    """
    g, p = _flat(gt), _flat(pred)
    _check_same_size(g, p)
    return _intersections_of_flat(g, p)


def _intersections_of_flat(
    g: Optional[np.ndarray], p: Optional[np.ndarray]
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    g_sparse = _to_sparse(g) if g is not None else None
    p_sparse = _to_sparse(p) if p is not None else None
    gt_area = np.diff(g_sparse.indptr) if g_sparse is not None else np.zeros(0, np.int64)
    pred_area = np.diff(p_sparse.indptr) if p_sparse is not None else np.zeros(0, np.int64)
    if g_sparse is None or p_sparse is None:
        return np.zeros((gt_area.size, pred_area.size), np.int64), gt_area, pred_area
    inter = (g_sparse @ p_sparse.T).toarray().astype(np.int64, copy=False)
    return inter, gt_area, pred_area


def _iou_from_counts(inter: np.ndarray, gt_area: np.ndarray, pred_area: np.ndarray) -> np.ndarray:
    union = gt_area[:, None] + pred_area[None, :] - inter
    return np.divide(inter, union, out=np.zeros(inter.shape, np.float64), where=union > 0)


def iou_matrix(gt: Masks, pred: Masks) -> np.ndarray:
    """(G, P) mask IoU between every GT and every prediction."""
    return _iou_from_counts(*pairwise_intersections(gt, pred))


def aji_counts(gt: Masks, pred: Masks) -> Tuple[int, int]:
    """AJI numerator C and denominator U of one image.

    The MoNuSeg challenge ranks by the mean over images of C/U (:func:`aggregated_jaccard_index` per image);
    sum C / sum U over images is the pooled AJI, reported beside it under that name."""
    return _aji_from_counts(*pairwise_intersections(gt, pred))


def _aji_from_counts(inter: np.ndarray, gt_area: np.ndarray, pred_area: np.ndarray) -> Tuple[int, int]:
    if gt_area.size == 0:
        return 0, int(pred_area.sum())
    if pred_area.size == 0:
        return 0, int(gt_area.sum())
    iou = _iou_from_counts(inter, gt_area, pred_area)
    best = iou.argmax(axis=1)
    rows = np.arange(gt_area.size)
    paired = iou[rows, best] > 0
    best_inter = inter[rows, best]
    best_union = gt_area + pred_area[best] - best_inter
    c = int(best_inter[paired].sum())
    u = int(best_union[paired].sum()) + int(gt_area[~paired].sum())
    used = np.zeros(pred_area.size, dtype=bool)
    used[best[paired]] = True
    u += int(pred_area[~used].sum())
    return c, u


def aggregated_jaccard_index(gt: Masks, pred: Masks) -> float:
    """AJI of one image (see module docstring); 1.0 when there is neither GT nor prediction."""
    c, u = aji_counts(gt, pred)
    return _ratio(c, u, empty=u == 0)


def match_objects(iou: np.ndarray, iou_thresh: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    """One-to-one (gt_idx, pred_idx) pairs with IoU > ``iou_thresh``: most pairs, then largest IoU sum."""
    valid = iou > iou_thresh
    if not valid.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Weight (n + 1 + iou) per valid pair: one more match always beats any gain in IoU (k <= n matches).
    n = min(iou.shape)
    weight = np.where(valid, n + 1.0 + iou, 0.0)
    gi, pi = linear_sum_assignment(weight, maximize=True)
    keep = valid[gi, pi]
    return gi[keep], pi[keep]


def object_f1(gt: Masks, pred: Masks, iou: float = 0.5) -> F1Result:
    """Object precision/recall/F1 with one-to-one matching at IoU > ``iou``; all 1.0 when both are empty."""
    num_gt, num_pred = len(gt), len(pred)
    tp = 0
    if num_gt and num_pred:
        tp = int(match_objects(iou_matrix(gt, pred), iou)[0].size)
    return f1_from_counts(tp, num_pred - tp, num_gt - tp)


def f1_from_counts(tp: int, fp: int, fn: int) -> F1Result:
    """Precision, recall and F1 from (summed) counts, with the module's empty-case convention."""
    empty = tp + fp + fn == 0
    return F1Result(
        precision=_ratio(tp, tp + fp, empty),
        recall=_ratio(tp, tp + fn, empty),
        f1=_ratio(2 * tp, 2 * tp + fp + fn, empty),
        tp=int(tp),
        fp=int(fp),
        fn=int(fn),
    )


def _union_counts(gt: Masks, pred: Masks) -> Tuple[int, int, int]:
    """(|A & B|, |A|, |B|) for A = union of GT masks, B = union of predicted masks."""
    g, p = _flat(gt), _flat(pred)
    _check_same_size(g, p)
    return _union_counts_of_flat(g, p)


def _union_counts_of_flat(g: Optional[np.ndarray], p: Optional[np.ndarray]) -> Tuple[int, int, int]:
    a = g.any(axis=0) if g is not None else None
    b = p.any(axis=0) if p is not None else None
    area_a = int(a.sum()) if a is not None else 0
    area_b = int(b.sum()) if b is not None else 0
    inter = int(np.count_nonzero(a & b)) if a is not None and b is not None else 0
    return inter, area_a, area_b


def dice(gt: Masks, pred: Masks) -> float:
    """Pixel Dice 2|A & B| / (|A| + |B|) of the GT union A and prediction union B; 1.0 when both are empty."""
    inter, area_a, area_b = _union_counts(gt, pred)
    return _ratio(2 * inter, area_a + area_b, empty=area_a + area_b == 0)


def pixel_iou(gt: Masks, pred: Masks) -> float:
    """Pixel IoU |A & B| / |A | B| of the GT union A and prediction union B; 1.0 when both are empty."""
    inter, area_a, area_b = _union_counts(gt, pred)
    return _ratio(inter, area_a + area_b - inter, empty=area_a + area_b == 0)


class ClassCounts(NamedTuple):
    """Everything one image contributes for one class: AJI C and U, F1 tp/fp/fn, pixel Dice and IoU."""

    aji_c: int
    aji_u: int
    tp: int
    fp: int
    fn: int
    dice: float
    iou: float


def class_counts(gt: Masks, pred: Masks, iou: float = 0.5) -> ClassCounts:
    """:func:`aji_counts`, :func:`object_f1`, :func:`dice` and :func:`pixel_iou` of one image in one pass.

    Same values as the four calls, but the mask stacks are flattened, and the pairwise intersections and the
    unions computed, once: on a dense H&E tile (up to 1000 predicted 1000 x 1000 masks, ~1 GB as booleans)
    the separate calls scan that stack six times."""
    g, p = _flat(gt), _flat(pred)
    _check_same_size(g, p)
    inter, gt_area, pred_area = _intersections_of_flat(g, p)
    c, u = _aji_from_counts(inter, gt_area, pred_area)
    tp = 0
    if gt_area.size and pred_area.size:
        tp = int(match_objects(_iou_from_counts(inter, gt_area, pred_area), iou)[0].size)
    both, area_a, area_b = _union_counts_of_flat(g, p)
    empty = area_a + area_b == 0
    return ClassCounts(
        aji_c=c,
        aji_u=u,
        tp=tp,
        fp=int(pred_area.size) - tp,
        fn=int(gt_area.size) - tp,
        dice=_ratio(2 * both, area_a + area_b, empty),
        iou=_ratio(both, area_a + area_b - both, empty),
    )
