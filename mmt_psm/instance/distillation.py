"""MMT-PSM distillation losses: semantic (``loss_psm``) and mask-guided feature (``loss_mgd``), plus adaptors.

Normalisations follow the authors' maskrcnn-benchmark code:
- ``loss_psm`` (``FastRCNNLossComputation.cls_loss``):
  ``(-q * log_softmax(s) * w[:, None]).mean(0).sum() / 3`` over the kept proposals, with
  ``q = sharpen(softmax(mean teacher logits), T)`` and 3 = num_classes + 1 of their two-class data. That is
  ``sum_i w_i CE(q_i, p_i) / #kept / (C+1)``: the mean is over the NUMBER of kept proposals, not over the sum
  of their weights.
- ``loss_mgd`` (``fg_hint_loss`` in ``generalized_rcnn.py``): foreground map average-pooled to each level with
  ``F.adaptive_avg_pool2d`` and thresholded (``> 0.5``); per level
  ``sum((Fs - Ft)^2 * M) / (sum(M) * C + 1e-7)`` with the sums over the whole batch; mean over
  (views x) levels. Without the mask it is their ``naive_hint_loss``, ``sum((Fs - Ft)^2) / numel``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sharpen", "mined_semantic_distillation_loss", "mask_guided_feature_loss", "FeatureAdaptors"]


def sharpen(probs: torch.Tensor, T: float = 0.5) -> torch.Tensor:
    """Temperature sharpening on the last dim: ``p^(1/T) / sum(p^(1/T))`` (MixMatch; authors' ``sharpen``)."""
    if T <= 0:
        raise ValueError(f"temperature must be > 0, got {T}")
    pt = probs.clamp_min(0).pow(1.0 / T)
    return pt / pt.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(pt.dtype).tiny)


def mined_semantic_distillation_loss(
    student_logits: torch.Tensor,
    teacher_mean_logits: torch.Tensor,
    weights: torch.Tensor,
    T: float = 0.5,
) -> torch.Tensor:
    """Weighted soft cross-entropy from the sharpened teacher ensemble to the student, per proposal.

    Args:
        student_logits: ``[N, C+1]`` student box-head class logits (grad flows here only).
        teacher_mean_logits: ``[N, C+1]`` mean teacher logits over views (no grad).
        weights: ``[N]`` from ``mine_negatives`` (0 = not kept).
        T: sharpening temperature.
    Returns:
        ``sum_i w_i * CE(q_i, softmax(s_i)) / max(#kept, 1) / (C+1)``, a float32 scalar; an exact zero that
        still carries grad when nothing is kept. ``q = softmax(z_mean / T)``, which equals
        ``sharpen(softmax(z_mean), T)`` but cannot underflow.
    """
    if student_logits.shape != teacher_mean_logits.shape or student_logits.dim() != 2:
        raise ValueError("student_logits and teacher_mean_logits must both be [N, C+1]")
    num_cls = student_logits.shape[1]
    w = weights.detach().float()
    q = F.softmax(teacher_mean_logits.detach().float() / T, dim=-1)
    log_p = F.log_softmax(student_logits.float(), dim=-1)
    ce = -(q * log_p).sum(dim=-1)
    # torch.where instead of w * ce: a non-finite logit of a dropped proposal must not make the loss NaN.
    weighted = torch.where(w > 0, w * ce, torch.zeros_like(ce))
    num_kept = (w > 0).sum().clamp_min(1)
    return weighted.sum() / num_kept / num_cls


def _level_mask(fg_mask: torch.Tensor, size) -> torch.Tensor:
    """Foreground map average-pooled to a level's ``(h, w)`` and thresholded at 0.5 -> {0, 1} float."""
    pooled = F.adaptive_avg_pool2d(fg_mask, tuple(size))
    return (pooled > 0.5).to(pooled.dtype)


def mask_guided_feature_loss(
    student_feats: Dict[str, torch.Tensor],
    teacher_feats: Dict[str, torch.Tensor],
    fg_mask: Optional[torch.Tensor],
    use_mask: bool = True,
    levels: Optional[Iterable[str]] = None,
) -> torch.Tensor:
    """Squared feature distance on the foreground, mean over levels (teacher features detached).

    Args:
        student_feats / teacher_feats: level name -> ``[B, C, H, W]`` (already adapted, same frame: flipped
        teacher
            views must be flipped back first, see ``views.flip_feature_map``).
        fg_mask: ``[B, 1, H0, W0]`` (or ``[B, H0, W0]``) foreground map in the padded image frame (union of
            pseudo masks); ignored when ``use_mask`` is False.
        use_mask: False = plain mean square error over the whole map (mean-teacher feature consistency).
        levels: which levels to use (default: all keys of ``student_feats``).
    Returns:
        Float32 scalar. An empty mask gives an exact zero (the denominator is 1e-7) that still carries grad.
    """
    names = list(levels) if levels is not None else list(student_feats.keys())
    if not names:
        raise ValueError("no feature levels given")
    mask = None
    if use_mask:
        if fg_mask is None:
            raise ValueError("fg_mask is required when use_mask=True")
        mask = fg_mask.float()
        if mask.dim() == 3:
            mask = mask[:, None]
    per_level = []
    for name in names:
        fs = student_feats[name].float()
        ft = teacher_feats[name].detach().float()
        if fs.shape != ft.shape:
            raise ValueError(f"level {name}: student {tuple(fs.shape)} vs teacher {tuple(ft.shape)}")
        sq = (fs - ft).pow(2)
        if mask is None:
            per_level.append(sq.sum() / sq.numel())
            continue
        m = _level_mask(mask.to(fs.device), fs.shape[-2:])
        per_level.append((sq * m).sum() / (m.sum() * fs.shape[1] + 1e-7))
    return torch.stack(per_level).mean()


class FeatureAdaptors(nn.Module):
    """One 1x1 ``Conv2d(in_channels -> out_channels)`` per named level (authors' ``MaskRCNNFPNAdaptor``).

    The student and the teacher each own one (the teacher's is the EMA of the student's). Initialised as in
    the authors' code: ``kaiming_uniform_(a=1)`` weights, zero bias.
    """

    def __init__(self, in_features: Iterable[str], in_channels: int = 256, out_channels: int = 128) -> None:
        super().__init__()
        self.in_features = list(in_features)
        self.adaptors = nn.ModuleDict()
        for name in self.in_features:
            conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)
            self.adaptors[name] = conv

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Adapt every configured level (all must be present in ``features``); returns a new dict."""
        return {name: self.adaptors[name](features[name]) for name in self.in_features}
