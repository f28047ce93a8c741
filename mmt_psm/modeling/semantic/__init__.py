"""Semantic siblings: the U-Net backbone/head, mixed supervision and the LCC mean teacher (registration by import)."""
from .lcc_mean_teacher import LCCMeanTeacherSegmentor
from .mixed_supervision import MixedSupervisionSegmentor
from .unet import UNetEncoder, UNetHead, build_unet_backbone

__all__ = ["LCCMeanTeacherSegmentor", "MixedSupervisionSegmentor", "UNetEncoder", "UNetHead", "build_unet_backbone"]
