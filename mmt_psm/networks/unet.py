"""A U-Net for Detectron2's ``SemanticSegmentor``: encoder in BACKBONE_REGISTRY, full-resolution decoder in
SEM_SEG_HEADS_REGISTRY.

Why: the stock stride-4 ``SemSegFPNHead`` trained from scratch is too coarse for small cardiac structures (an
R50-FPN from scratch reached mean Dice 0.41 / 0.60 on ACDC with 3 / 15 labeled patients). This is the 2D U-Net
of SSL4MIS/WSL4MIS (channels 16-256, dropout 0.05-0.5 in the encoder, bilinear up-sampling), split along
Detectron2's backbone/head line so that a plain ``SemanticSegmentor`` config builds it.

This file imports nothing from ``mmt_psm``: loading it alone (``importlib`` by path, or ``import
mmt_psm.networks.unet``) registers ``build_unet_backbone`` and ``UNetHead``, which is all an exported
model needs in Detectron2's ``DefaultPredictor``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, SEM_SEG_HEADS_REGISTRY, Backbone
from torch import nn

__all__ = ["UNetEncoder", "UNetHead", "build_unet_backbone", "add_unet_config", "soft_dice_loss",
           "channels_last_on_cpu"]


def channels_last_on_cpu(module: nn.Module, device: str) -> nn.Module:
    """``module`` with its 4-D parameters in channels_last (NHWC) memory when ``device`` (``MODEL.DEVICE``) is the
    CPU, else as it is. oneDNN then runs the convolutions, BatchNorms and their backward in NHWC: an ACDC training
    step at 256 px (supervised_p3, mixed, mean_teacher, lcc; this U-Net or the MobileNetV2 one) took 30-37 % less
    CPU time on one thread, e.g. mean_teacher with MobileNetV2 1.91 -> 1.32 s (interleaved A/B), with the same
    results up to float rounding. CUDA keeps the default layout (not measured there). Checkpoints load either way
    (``load_state_dict`` copies values into the parameters' layout)."""
    if torch.device(device).type == "cpu":
        module.to(memory_format=torch.channels_last)
    return module


def add_unet_config(cfg: CfgNode) -> None:
    """``MODEL.UNET`` (encoder) and the decoder head's extra ``MODEL.SEM_SEG_HEAD`` keys (idempotent)."""
    if hasattr(cfg.MODEL, "UNET"):
        return
    cfg.MODEL.UNET = CfgNode()
    # channels of the encoder stages res1..res5 (strides 1, 2, 4, 8, 16)
    cfg.MODEL.UNET.CHANNELS = (16, 32, 64, 128, 256)
    # dropout after the first conv of each encoder stage (SSL4MIS: 0.05, 0.1, 0.2, 0.3, 0.5)
    cfg.MODEL.UNET.DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)
    cfg.MODEL.UNET.NORM = "BN"
    # soft Dice loss weight next to the cross-entropy (SSL4MIS trains with 0.5 * (CE + Dice)); 0 = CE only
    cfg.MODEL.SEM_SEG_HEAD.DICE_WEIGHT = 0.0


class ConvBlock(nn.Sequential):
    """conv3x3-norm-LeakyReLU-dropout-conv3x3-norm-LeakyReLU (SSL4MIS ``ConvBlock``)."""

    def __init__(self, cin: int, cout: int, dropout: float, norm: str):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), get_norm(norm, cout), nn.LeakyReLU(),
            nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1), get_norm(norm, cout), nn.LeakyReLU(),
        )


class UNetEncoder(Backbone):
    """U-Net encoder; outputs ``res1``..``res5`` at strides 1, 2, 4, 8, 16."""

    def __init__(self, in_channels: int, channels: Sequence[int], dropout: Sequence[float], norm: str = "BN"):
        super().__init__()
        if len(channels) != len(dropout) or len(channels) < 2:
            raise ValueError(f"MODEL.UNET.CHANNELS {channels} and DROPOUT {dropout} need the same length >= 2")
        self.stage_names = [f"res{i + 1}" for i in range(len(channels))]
        cin = in_channels
        for name, cout, p in zip(self.stage_names, channels, dropout):
            self.add_module(name, ConvBlock(cin, cout, p, norm))
            cin = cout
        self._out_feature_channels = dict(zip(self.stage_names, channels))
        self._out_feature_strides = {n: 2**i for i, n in enumerate(self.stage_names)}
        self._out_features = list(self.stage_names)

    @property
    def size_divisibility(self) -> int:
        return 2 ** (len(self.stage_names) - 1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {}
        for i, name in enumerate(self.stage_names):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = getattr(self, name)(x)
            out[name] = x
        return out


@BACKBONE_REGISTRY.register()
def build_unet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> UNetEncoder:
    """``MODEL.BACKBONE.NAME: build_unet_backbone``; input channels = ``len(MODEL.PIXEL_MEAN)``; NHWC parameters on
    the CPU (:func:`channels_last_on_cpu`)."""
    encoder = UNetEncoder(input_shape.channels, cfg.MODEL.UNET.CHANNELS, cfg.MODEL.UNET.DROPOUT, cfg.MODEL.UNET.NORM)
    return channels_last_on_cpu(encoder, cfg.MODEL.DEVICE)


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_value: int, eps: float = 1e-5) -> torch.Tensor:
    """Mean over classes of ``1 - (2 sum(p g) + eps) / (sum(p^2) + sum(g) + eps)`` on non-ignored pixels
    (SSL4MIS ``DiceLoss`` with softmax, background included). Computed in fp32 whatever the logits' dtype: a class's
    pixel count exceeds fp16's 65504 from 4 images of 128 x 128."""
    logits = logits.float()
    num_classes = logits.shape[1]
    valid = (targets != ignore_value).unsqueeze(1).to(logits.dtype)
    probs = logits.softmax(dim=1) * valid
    onehot = F.one_hot(targets.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).to(logits.dtype) * valid
    dims = (0, 2, 3)
    inter, p2, g = (probs * onehot).sum(dims), (probs * probs).sum(dims), onehot.sum(dims)
    return (1.0 - (2.0 * inter + eps) / (p2 + g + eps)).mean()


@SEM_SEG_HEADS_REGISTRY.register()
class UNetHead(nn.Module):
    """U-Net decoder: from the deepest feature, 1x1 conv + bilinear x2 + concat skip + ConvBlock per level, then a
    3x3 classifier at stride 1. Losses: CE (ignoring ``IGNORE_VALUE``) + ``DICE_WEIGHT`` * soft Dice. ``device``:
    where it will run (NHWC parameters on the CPU, :func:`channels_last_on_cpu`; "" keeps the default layout)."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        ignore_value: int = 255,
        loss_weight: float = 1.0,
        dice_weight: float = 0.0,
        norm: str = "BN",
        device: str = "",
    ):
        super().__init__()
        names = sorted(input_shape, key=lambda k: input_shape[k].stride)
        strides = [input_shape[k].stride for k in names]
        if strides[0] != 1 or any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"UNetHead needs features at strides 1, 2, 4, ... ; got {dict(zip(names, strides))}")
        self.in_features = names
        ch = [input_shape[k].channels for k in names]
        self.reduce = nn.ModuleList([nn.Conv2d(ch[i + 1], ch[i], 1) for i in range(len(ch) - 1)])
        self.fuse = nn.ModuleList([ConvBlock(2 * ch[i], ch[i], 0.0, norm) for i in range(len(ch) - 1)])
        self.predictor = nn.Conv2d(ch[0], num_classes, 3, padding=1)
        self.num_classes, self.ignore_value = num_classes, ignore_value
        self.loss_weight, self.dice_weight = loss_weight, dice_weight
        self.feature_channels = ch[0]
        if device:
            channels_last_on_cpu(self, device)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> dict:
        feats = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in feats},
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "dice_weight": cfg.MODEL.SEM_SEG_HEAD.get("DICE_WEIGHT", 0.0),
            "norm": cfg.MODEL.SEM_SEG_HEAD.NORM or "BN",
            "device": cfg.MODEL.DEVICE,  # NHWC parameters on the CPU (channels_last_on_cpu)
        }

    def decode(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(last decoder feature map at stride 1, class logits at stride 1)."""
        x = features[self.in_features[-1]]
        for i in range(len(self.in_features) - 2, -1, -1):
            skip = features[self.in_features[i]]
            x = F.interpolate(self.reduce[i](x), size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = self.fuse[i](torch.cat([skip, x], dim=1))
        return x, self.predictor(x)

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decode(features)[1]

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None):
        logits = self.layers(features)
        if self.training:
            return None, self.losses(logits, targets)
        return logits, {}

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``loss_sem_seg`` (CE) and, when ``dice_weight > 0``, ``loss_dice``."""
        out = {"loss_sem_seg": supervised_ce(logits, targets, self.ignore_value) * self.loss_weight}
        if self.dice_weight > 0:
            out["loss_dice"] = soft_dice_loss(logits, targets, self.ignore_value) * self.dice_weight
        return out


def supervised_ce(logits: torch.Tensor, targets: torch.Tensor, ignore_value: int) -> torch.Tensor:
    """Mean CE over the pixels that are not ``ignore_value``; an exact (graph-connected) 0 when there are none.
    In fp32 (the summed CE and the pixel count overflow fp16)."""
    valid = (targets != ignore_value).sum()  # no host sync: no valid pixel gives 0 / 1
    ce = F.cross_entropy(logits.float(), targets.long(), ignore_index=ignore_value, reduction="sum")
    return ce / valid.clamp(min=1).to(ce.dtype)

