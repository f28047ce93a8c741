"""Shared plumbing of the semantic teacher-student models: one ``SemanticSegmentor`` forward that also returns
the decoder's last feature map, and the student built from the same config with Detectron2's own builder."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from torch import nn

from .losses import valid_mask


def build_student(cfg: CfgNode, architecture: str) -> nn.Module:
    """``architecture`` (e.g. ``SemanticSegmentor``) built by Detectron2 from ``cfg``; its head must ``decode``."""
    sub = cfg.clone()
    sub.defrost()
    sub.MODEL.META_ARCHITECTURE = architecture
    model = build_model(sub)
    if not hasattr(model, "sem_seg_head") or not hasattr(model.sem_seg_head, "decode"):
        raise ValueError(f"{architecture} with head {cfg.MODEL.SEM_SEG_HEAD.NAME!r} cannot be used here: the "
                         "semantic teacher-student models need a head with decode() -> (features, logits), "
                         "e.g. MODEL.SEM_SEG_HEAD.NAME UNetHead")
    return model


def images_of(model: nn.Module, batched: List[Dict], noise: Optional[Tuple[float, float]] = None) -> ImageList:
    """Normalised, padded images of ``batched``; ``noise = (std, clip)`` adds SSL4MIS's clipped Gaussian noise in
    [0, 1] intensity units (x 255 on the 0-255 input scale) before normalisation."""
    tensors = []
    for d in batched:
        x = d["image"].to(model.device, dtype=torch.float32)
        if noise is not None and noise[0] > 0:
            x = x + torch.clamp(torch.randn_like(x) * noise[0], -noise[1], noise[1]) * 255.0
        tensors.append((x - model.pixel_mean) / model.pixel_std)
    return ImageList.from_tensors(tensors, model.backbone.size_divisibility)


def targets_of(model: nn.Module, batched: List[Dict], shape: Tuple[int, int]) -> Optional[torch.Tensor]:
    """(N, H, W) label maps padded with the ignore value (images without ``sem_seg`` all ignore); None when no
    dict has one. ``shape`` is the WHOLE batch's padded size (labeled + weak images share one forward), which
    ``ImageList.from_tensors`` on this subset alone would not give when image sizes differ."""
    ignore = model.sem_seg_head.ignore_value
    if not any("sem_seg" in d for d in batched):
        return None
    out = torch.full((len(batched), *shape), ignore, dtype=torch.long, device=model.device)
    for i, d in enumerate(batched):
        if "sem_seg" in d:
            t = d["sem_seg"].to(model.device)
            out[i, : t.shape[0], : t.shape[1]] = t
    return out


def segment(model: nn.Module, images: ImageList) -> Tuple[torch.Tensor, torch.Tensor]:
    """(decoder features, logits), both at the padded input resolution."""
    return model.sem_seg_head.decode(model.backbone(images.tensor))


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
