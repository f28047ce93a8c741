"""PSM stage 1: a small CNN with a scalar output, trained without labels so that f(x) = f(rot180(x)) (L1).

Why this task: the paper's "similarity" pretext task needs no annotation; what matters downstream is only the
gradient of the scalar w.r.t. the shallowest stage (stage 2), which responds to the low-level texture and colour
that nuclei are made of. The network is fully convolutional with max-pooling (no strided convolutions), so a
network whose kernels are 180-degree symmetric is exactly rot180-equivariant up to the pooled output (tested).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SelfSupervisedNet", "random_crops", "rot180_l1_loss", "train_self_supervised"]

logger = logging.getLogger(__name__)


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False))


class SelfSupervisedNet(nn.Module):
    """stem (conv, stride 1) -> max-pool -> ``layer1`` (the shallowest stage: ``blocks`` conv blocks, Grad-CAM is
    taken here) -> [max-pool -> conv block] per deeper width -> global average pool -> linear -> scalar."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128), blocks: int = 2):
        super().__init__()
        c0 = channels[0]
        self.stem = _Block(3, c0)
        self.layer1 = nn.Sequential(*[_Block(c0, c0) for _ in range(blocks)])
        deeper, cin = [], c0
        for c in channels[1:]:
            deeper += [nn.MaxPool2d(2), _Block(cin, c)]
            cin = c
        self.deeper = nn.Sequential(*deeper)
        self.fc = nn.Linear(cin, 1)
        self.register_buffer("pixel_mean", torch.tensor([180.0, 130.0, 170.0]).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([40.0, 50.0, 35.0]).view(1, 3, 1, 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 255] -> normalised (H&E-typical mean/std; exact values matter little)."""
        return (images - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 255] -> (N,) scalars."""
        x = F.max_pool2d(self.stem(self.normalize(images)), 2)
        x = self.deeper(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3))).squeeze(1)


def rot180_l1_loss(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``mean |f(x) - f(rot180(x))|`` over the batch (the PSM pretext loss)."""
    return (net(images) - net(torch.rot90(images, 2, dims=(2, 3)))).abs().mean()


def random_crops(images: List[np.ndarray], n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """(n, 3, size, size) float crops (random image, position, flips; images smaller than ``size`` padded)."""
    out = np.zeros((n, size, size, 3), np.float32)
    for i in range(n):
        img = images[int(rng.integers(len(images)))]
        h, w = img.shape[:2]
        y, x = int(rng.integers(max(h - size, 0) + 1)), int(rng.integers(max(w - size, 0) + 1))
        crop = img[y: y + size, x: x + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < 0.5:
            crop = crop[::-1]
        out[i, : crop.shape[0], : crop.shape[1]] = crop
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def train_self_supervised(
    images: List[np.ndarray], iters: int = 300, crop: int = 128, batch: int = 8, lr: float = 1e-3,
    channels: Sequence[int] = (16, 32, 64, 128), seed: int = 0,
    progress: Optional[Callable[[int, float], None]] = None, device: str = "cpu",
) -> SelfSupervisedNet:
    """Train :class:`SelfSupervisedNet` on random crops of ``images`` (HxWx3 uint8 RGB) with the rot180 L1 loss
    (Adam) on ``device`` (the crops are drawn on the host either way, so a seed gives the same crops); returns the
    network in eval mode, on the CPU (stage 2 runs there). ``progress(iteration, loss)`` is called every 50
    iterations."""
    if not images:
        raise ValueError("self-supervised training needs at least one image")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = SelfSupervisedNet(channels).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    start = time.perf_counter()
    for it in range(iters):
        loss = rot180_l1_loss(net, random_crops(images, batch, crop, rng).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None and ((it + 1) % 50 == 0 or it + 1 == iters):
            progress(it + 1, loss.item())
    logger.info(f"self-supervised net: {iters} iterations on {device} in {time.perf_counter() - start:.1f} s")
    return net.cpu().eval()
