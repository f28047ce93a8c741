"""Perturbation sensitivity of proposals and sensitivity-based negative mining (MMT-PSM, steps 4-5).

The teacher box head classifies the same proposals on K perturbed views. A proposal whose class probabilities
change a lot between views is "perturbation sensitive"; MMT-PSM keeps every positive proposal and only the
most sensitive negatives (hard negatives), which fixes the heavy background imbalance of the distillation
targets.

Authors' code (``FastRCNNLossComputation._mean_var_logits`` / ``evaluatePSM``, with ``MT.CLS_LOSS_TYPE 'bce'``
as in ``scripts/train_mt.sh``): the target is the mean of the RAW logits over views, the sensitivity is
``torch.std`` (unbiased, Bessel-corrected) of the SOFTMAX probabilities over views, summed over classes;
negatives are ``argsort(descending=True)`` by it and the first ``min(#neg, int(#pos / 2))`` kept, with weight
1.5 (``MT.CLS_BALANCE_WEIGHT``). The mining runs over all sampled proposals of the batch concatenated.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["proposal_sensitivity", "mine_negatives"]


def proposal_sensitivity(
    view_logits: torch.Tensor, unbiased: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean logits over views and per-proposal sensitivity.

    Args:
        view_logits: ``[K, N, C+1]`` class logits of the same N proposals on K views.
        unbiased: Bessel-corrected std over views (the authors' ``torch.std`` default). With K = 1 the
            sensitivity is defined as 0 (no spread can be measured).
    Returns:
        ``mean_logits [N, C+1]`` (mean over views of the logits) and ``sensitivity [N]``
        (sum over classes of the std over views of ``softmax(z_k)``), both in float32, without grad.
    """
    if view_logits.dim() != 3:
        raise ValueError(f"view_logits must be [K, N, C+1], got shape {tuple(view_logits.shape)}")
    z = view_logits.detach().float()
    mean_logits = z.mean(dim=0)
    if z.shape[0] < 2:
        return mean_logits, z.new_zeros(z.shape[1])
    probs = F.softmax(z, dim=-1)
    std = probs.std(dim=0, correction=1 if unbiased else 0)
    return mean_logits, std.sum(dim=-1)


def mine_negatives(
    is_positive: torch.Tensor,
    sensitivity: torch.Tensor,
    ratio: float = 0.5,
    negative_weight: float = 1.5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep all positives and the ``floor(|P| * ratio)`` most sensitive negatives.

    Args:
        is_positive: ``BoolTensor[N]``; every other proposal counts as a negative (filter ignored ones first).
        sensitivity: ``[N]`` from :func:`proposal_sensitivity`.
        ratio: negatives kept per positive (0.5 = the paper's |P|/2).
        negative_weight: loss weight of a kept negative (positives weigh 1).
    Returns:
        ``keep: BoolTensor[N]`` and ``weights [N]`` (1 positive, ``negative_weight`` mined negative, 0
        otherwise). With no positive nothing is kept; with fewer negatives than requested all negatives are
        kept.

    Vectorised and free of host syncs: negatives are ranked by a stable descending sort (ties keep the lower
    index, like the authors' ``argsort``) and a negative is kept when its rank is below the (tensor) quota.
    """
    if is_positive.dim() != 1 or sensitivity.shape != is_positive.shape:
        raise ValueError("is_positive and sensitivity must both be [N]")
    is_positive = is_positive.bool()
    n = is_positive.numel()
    device = sensitivity.device
    # Small epsilon so that e.g. 10 * 0.7 = 7.000000000000001 and 100 * 0.29 = 28.999999999999996 floor right.
    quota = torch.floor(is_positive.sum().to(torch.float64) * float(ratio) + 1e-9).to(torch.long)
    score = torch.nan_to_num(sensitivity.detach().float(), nan=0.0, posinf=math.inf, neginf=0.0)
    score = torch.where(is_positive, torch.full_like(score, -math.inf), score)
    order = torch.sort(score, descending=True, stable=True).indices
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[order] = torch.arange(n, device=device)
    mined = (~is_positive) & (rank < quota)
    keep = is_positive | mined
    weights = is_positive.float() + mined.float() * float(negative_weight)
    return keep, weights
