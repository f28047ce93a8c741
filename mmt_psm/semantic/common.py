"""Plumbing of the semantic teacher-student models beyond ``mmt_psm.networks.segmentor``: the un-padded image
mask, and a labeled + unlabeled forward whose BatchNorm statistics come from the labeled images alone."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Tuple

import torch
from detectron2.structures import ImageList
from torch import nn

from mmt_psm.networks.segmentor import segment
from mmt_psm.semantic.losses import valid_mask


def image_mask(images: ImageList) -> torch.Tensor:
    """(N, H, W) True inside each image (not in padding)."""
    return valid_mask(images.image_sizes, tuple(images.tensor.shape[-2:]), images.tensor.device)


@contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm layers still normalise with the batch's statistics but do not update their running
    statistics (momentum 0: running = 1 * running + 0 * batch; also under Detectron2's NaiveSyncBatchNorm), so
    those stay the labeled images' alone. ``num_batches_tracked`` is restored too (it drives ``momentum=None``)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def segment_split(model: nn.Module, images: ImageList, n_lab: int, bn_stats: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``segment`` of a labeled + unlabeled batch. ``bn_stats="joint"``: one forward (SSL4MIS), BatchNorm sees
    both kinds of image; ``"labeled"``: two forwards, BatchNorm's running statistics (used at test time) come
    from the labeled images only, as in supervised training."""
    if bn_stats == "joint" or n_lab == images.tensor.shape[0]:
        return segment(model, images)
    if bn_stats != "labeled":
        raise ValueError(f"BN_STATS must be 'joint' or 'labeled', got {bn_stats!r}")
    head, backbone = model.sem_seg_head, model.backbone
    feats_l, logits_l = head.decode(backbone(images.tensor[:n_lab]))
    with frozen_bn_statistics(model):
        feats_u, logits_u = head.decode(backbone(images.tensor[n_lab:]))
    return torch.cat([feats_l, feats_u]), torch.cat([logits_l, logits_u])
