"""PSM stage 1: a small CNN with a scalar output, trained without labels so that f(x) = f(rot180(x)) (L1).

Why this task: the paper's "similarity" pretext task needs no annotation; what matters downstream is only the
gradient of the scalar w.r.t. the shallowest stage (stage 2), which responds to the low-level texture and colour
that nuclei are made of. The network is fully convolutional with max-pooling (no strided convolutions), so a
network whose kernels are 180-degree symmetric is exactly rot180-equivariant up to the pooled output (tested).

``PSM.SELF_SUP.ENCODER mobilenet_v2`` trains :class:`MobileNetV2SelfSupervisedNet` instead: the ImageNet
MobileNetV2 trunk of the stage-4/6 U-Net encoder (``MODEL.WEIGHTS``), Grad-CAM on its stride-2 stem.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from torch import nn

from mmt_psm.networks.mobilenet import STAGE_CHANNELS, MobileNetV2, check_pretrained_weights

__all__ = ["SelfSupervisedNet", "MobileNetV2SelfSupervisedNet", "build_self_supervised_net", "random_crops",
           "rot180_l1_loss", "train_self_supervised"]

ENCODERS = ("scratch", "mobilenet_v2")
# ImageNet statistics in 0-255 RGB, as the torchvision-style MobileNetV2 weights were trained with
IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

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

    def cam_layers(self) -> List[nn.Module]:
        """The modules whose outputs Grad-CAM averages (stage 2): the blocks of ``layer1``."""
        return list(self.layer1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 255] -> (N,) scalars."""
        x = F.max_pool2d(self.stem(self.normalize(images)), 2)
        x = self.deeper(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3))).squeeze(1)


class MobileNetV2SelfSupervisedNet(nn.Module):
    """ImageNet-normalised RGB -> ``body`` (MobileNetV2 ``features`` 0-13, to stride 16: the trunk of the stage-4/6
    U-Net encoder, same key names) -> global average pool -> linear -> scalar. Grad-CAM is taken on the stride-2
    stem (``features`` 0 and 1), its shallowest stage as ``layer1`` is :class:`SelfSupervisedNet`'s. Strided
    convolutions: not rot180-equivariant by construction."""

    def __init__(self, norm: str = "BN", freeze_at: int = 0):
        super().__init__()
        self.body = MobileNetV2(3, ("m4",), norm, freeze_at)
        self.fc = nn.Linear(STAGE_CHANNELS[3], 1)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 255] -> normalised with ImageNet's statistics (what the weights expect)."""
        return (images - self.pixel_mean) / self.pixel_std

    def cam_layers(self) -> List[nn.Module]:
        """The modules whose outputs Grad-CAM averages (stage 2): the stride-2 stem, ``features`` 0 and 1."""
        return [self.body.features[0], self.body.features[1]]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 255] -> (N,) scalars."""
        x = self.body(self.normalize(images))["m4"]
        return self.fc(x.mean(dim=(2, 3))).squeeze(1)


def build_self_supervised_net(cfg: CfgNode, pretrained: bool = True) -> nn.Module:
    """The stage-1 network ``PSM.SELF_SUP.ENCODER`` names: ``scratch`` (:class:`SelfSupervisedNet` with
    ``PSM.SELF_SUP.CHANNELS``) or ``mobilenet_v2`` (:class:`MobileNetV2SelfSupervisedNet`, norm
    ``MODEL.MOBILENET.UNET_NORM``, ``MODEL.BACKBONE.FREEZE_AT``; with ``pretrained`` its trunk is loaded from
    ``MODEL.WEIGHTS`` by Detectron2's checkpointer, and a trunk key the file lacks is a ValueError)."""
    s = cfg.PSM.SELF_SUP
    if s.ENCODER not in ENCODERS:
        raise ValueError(f"PSM.SELF_SUP.ENCODER must be one of {ENCODERS}, got {s.ENCODER!r}")
    if s.ENCODER == "scratch":
        return SelfSupervisedNet(tuple(s.CHANNELS))
    net = MobileNetV2SelfSupervisedNet(cfg.MODEL.MOBILENET.UNET_NORM, cfg.MODEL.BACKBONE.FREEZE_AT)
    if not pretrained:
        return net
    path = cfg.MODEL.WEIGHTS
    if not path:
        raise ValueError("PSM.SELF_SUP.ENCODER mobilenet_v2 starts from the ImageNet MobileNetV2 checkpoint in "
                         "MODEL.WEIGHTS, which is empty (e.g. MODEL.WEIGHTS pretrained/mobilenet_v2_imagenet.pth)")
    check_pretrained_weights(path)
    checkpointer = DetectionCheckpointer(net)
    incompatible = checkpointer._load_model(checkpointer._load_file(path))  # as its load(), keeping the keys
    checkpointer._log_incompatible_keys(incompatible)
    missing = [k for k in incompatible.missing_keys if k.startswith("body.")]
    if missing:
        raise ValueError(f"PSM.SELF_SUP.ENCODER mobilenet_v2: MODEL.WEIGHTS {path} lacks {len(missing)} MobileNetV2 "
                         f"trunk tensors (e.g. {missing[0]}); it must be the ImageNet checkpoint of "
                         "tools/prepare_pretrained.py")
    return net


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
    progress: Optional[Callable[[int, float], None]] = None, device: Union[str, torch.device] = "cpu",
    build: Optional[Callable[[], nn.Module]] = None,
) -> nn.Module:
    """Train :class:`SelfSupervisedNet` (or the network ``build()`` returns, built after seeding) on random crops of
    ``images`` (HxWx3 uint8 RGB) with the rot180 L1 loss (Adam, trainable parameters) on ``device`` (the PSM stages
    pass ``cfg.MODEL.DEVICE``); returns the network, on that device, in eval mode. ``progress(iteration, loss)`` is
    called every 50 iterations."""
    if not images:
        raise ValueError("self-supervised training needs at least one image")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = (build() if build is not None else SelfSupervisedNet(channels)).to(device)  # built on the CPU: the same
    # weights on every device
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    net.train()
    start = time.perf_counter()
    for it in range(iters):
        loss = rot180_l1_loss(net, random_crops(images, batch, crop, rng).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None and ((it + 1) % 50 == 0 or it + 1 == iters):
            progress(it + 1, loss.item())
    logger.info(f"self-supervised net: {iters} iterations in {time.perf_counter() - start:.1f} s")
    return net.eval()
