"""PSM stage 2: the self-activation map = Grad-CAM of the self-supervised scalar at the shallowest stage.

For every module of ``net.cam_layers()`` (``layer1``'s blocks; MobileNetV2's stride-2 stem) (activations A,
gradients dY/dA): channel weights = spatial mean of the gradient,
map = ReLU(sum_c w_c A_c); the maps of the blocks are averaged, up-sampled to the input size (bilinear), and
min-max normalised to [0, 1] over the whole image. Large images are processed in tiles (one global min-max).
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["grad_cam_raw", "self_activation_map", "min_max"]


def min_max(x: np.ndarray) -> np.ndarray:
    """``(x - min) / (max - min)`` as float32; all zeros for a constant map."""
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def grad_cam_raw(net: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """(H, W) un-normalised Grad-CAM (ReLU'd, averaged over ``net.cam_layers()``) of one (3, H, W) image."""
    acts: List[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, i, o: acts.append(o)) for blk in net.cam_layers()]
    try:
        with torch.enable_grad():
            # an input that requires grad: the activations do too where the layers are frozen (FREEZE_AT)
            x = image.unsqueeze(0).float().requires_grad_(True)
            score = net(x).sum()
            grads = torch.autograd.grad(score, acts)
    finally:
        for h in hooks:
            h.remove()
    cams = [F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)) for a, g in zip(acts, grads)]
    cam = torch.stack(cams).mean(dim=0, keepdim=True)  # (1, 1, h, w)
    return F.interpolate(cam.detach(), size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]


def self_activation_map(net: nn.Module, image: np.ndarray, tile: int = 1024) -> np.ndarray:
    """(H, W) float32 in [0, 1]: Grad-CAM of ``net`` on an HxWx3 uint8 RGB image, tiled by ``tile`` pixels (each
    tile computed on the network's device)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"self_activation_map expects an HxWx3 RGB image, got {image.shape}")
    net.eval()
    h, w = image.shape[:2]
    tile = max(int(tile), 8)
    device = next(net.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    raw = np.zeros((h, w), np.float32)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            part = x[:, y0: y0 + tile, x0: x0 + tile]
            ph, pw = part.shape[-2:]
            # pad to even size so pooling sees whole windows; crop back after
            padded = F.pad(part, (0, pw % 2, 0, ph % 2), mode="replicate")
            raw[y0: y0 + ph, x0: x0 + pw] = grad_cam_raw(net, padded.to(device))[:ph, :pw].cpu().numpy()
    return min_max(raw)
