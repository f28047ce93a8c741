"""Per-pixel losses of the semantic siblings, each a formula with its mask (tested against hand computations).

All maps are (N, C, H, W) logits or probabilities; masks are (N, H, W) bool/float; every masked mean is an exact,
graph-connected 0 when its mask is empty (a batch without kept pixels trains on, finite).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "valid_mask", "masked_mean", "kl_map", "entropy_map", "low_confidence_mask", "masked_softmax_mse",
    "class_feature_means", "update_prototypes", "class_separation_loss",
]


def valid_mask(image_sizes: Sequence[Tuple[int, int]], shape: Tuple[int, int], device=None) -> torch.Tensor:
    """(N, H, W) bool: True inside each image's un-padded (h, w) region of a padded batch."""
    mask = torch.zeros((len(image_sizes), *shape), dtype=torch.bool, device=device)
    for i, (h, w) in enumerate(image_sizes):
        mask[i, :h, :w] = True
    return mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor, over: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of ``values`` (N, H, W) over ``mask``; ``values.sum() * 0`` when the mask is empty. With ``over``
    (a mask containing ``mask``) the sum over ``mask`` is divided by the pixel count of ``over`` instead, so each
    masked pixel weighs what it would in a mean over ``over``. In fp32 (pixel counts and sums overflow fp16)."""
    values = values.float()
    m = mask.to(values.dtype)  # no host sync: an empty mask gives 0 / 1
    count = m.sum() if over is None else over.to(values.dtype).sum()
    return (values * m).sum() / count.clamp(min=1.0)


def kl_map(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(N, H, W) ``KL(p_target || p) = sum_c p_target (log p_target - log p)``; the target is detached."""
    log_t = F.log_softmax(target_logits.detach(), dim=1)
    return (log_t.exp() * (log_t - F.log_softmax(logits, dim=1))).sum(dim=1)


def entropy_map(logits: torch.Tensor) -> torch.Tensor:
    """(N, H, W) Shannon entropy ``-sum_c p log p`` of ``softmax(logits)`` (nats)."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def low_confidence_mask(teacher_probs: torch.Tensor, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask where the teacher's max probability < ``tau``, the teacher's argmax pseudo-labels)."""
    conf, pseudo = teacher_probs.max(dim=1)
    return conf < tau, pseudo


def masked_softmax_mse(student_probs: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor,
                       over: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum((p_s - p_t)^2 * mask) / (sum(mask) * C)``: with an all-true mask SSL4MIS's ``mean((p_s - p_t)^2)``.
    ``over``: divide by ``sum(over) * C`` instead (see :func:`masked_mean`)."""
    sq = ((student_probs - teacher_probs.detach()) ** 2).mean(dim=1)
    return masked_mean(sq, mask, over)


def class_feature_means(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_value: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-class feature sums (K, D), per-class pixel counts (K,)) of ``features`` (N, D, H, W) under ``labels``,
    both fp32 whatever the features' dtype and outside autocast (a class's pixel count and feature sum overflow
    fp16's 65504 from a few images)."""
    d = features.shape[1]
    flat = features.detach().permute(0, 2, 3, 1).reshape(-1, d).float()
    lab = labels.reshape(-1)
    keep = (lab != ignore_value) & (lab >= 0) & (lab < num_classes)
    onehot = F.one_hot(lab[keep].long(), num_classes).float()  # (P, K)
    with torch.autocast(device_type=flat.device.type, enabled=False):  # autocast would run the matmul in fp16
        return onehot.t() @ flat[keep], onehot.sum(dim=0)


@torch.no_grad()
def update_prototypes(
    prototypes: torch.Tensor, initialized: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, momentum: float
) -> None:
    """In place: ``P_c <- m P_c + (1 - m) mean_c`` for classes seen in this batch; first sight: ``P_c = mean_c``."""
    seen = counts > 0  # dense masks, no boolean indexing: no host sync
    means = (sums / counts.clamp(min=1).unsqueeze(1)).to(prototypes.dtype)
    updated = torch.where(initialized.unsqueeze(1), momentum * prototypes + (1.0 - momentum) * means, means)
    prototypes.copy_(torch.where(seen.unsqueeze(1), updated, prototypes))
    initialized |= seen


def class_separation_loss(
    features: torch.Tensor, pseudo: torch.Tensor, mask: torch.Tensor, prototypes: torch.Tensor,
    temperature: float, initialized: Optional[torch.Tensor] = None, over: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean over masked pixels of ``CE(cos(f, P) / T, pseudo)``: features pulled toward their pseudo-class
    prototype and away from the others. Pixels whose pseudo-class has no prototype yet are left out. ``over``:
    the sum divided by that mask's pixel count instead (see :func:`masked_mean`)."""
    if initialized is not None:
        mask = mask & initialized[pseudo]
    f = F.normalize(features.permute(0, 2, 3, 1), dim=-1)  # (N, H, W, D)
    logits = f @ F.normalize(prototypes.to(f.dtype), dim=-1).t() / temperature  # (N, H, W, K)
    ce = F.cross_entropy(logits.permute(0, 3, 1, 2), pseudo.long(), reduction="none")
    return masked_mean(ce, mask, over)


def split_by_flag(batched_inputs: List[dict]) -> Tuple[List[dict], List[dict]]:
    """(labeled dicts, unlabeled/weak dicts) by their ``labeled`` flag (missing flag = labeled)."""
    labeled = [d for d in batched_inputs if d.get("labeled", True)]
    return labeled, [d for d in batched_inputs if not d.get("labeled", True)]
