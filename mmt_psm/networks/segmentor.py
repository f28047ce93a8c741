"""Helpers of a Detectron2 ``SemanticSegmentor`` whose head can ``decode`` (the U-Net): the inner network built
from the same config, normalised images, padded targets, and one forward that also returns the decoder's last
feature map. Used by every model that wraps such a segmentor (mixed supervision, LCC, PSM nuclei)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from torch import nn

__all__ = ["build_semantic_segmentor", "images_of", "targets_of", "segment"]


def build_semantic_segmentor(cfg: CfgNode, architecture: str) -> nn.Module:
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
