"""Networks shared by tasks, registered with Detectron2 by import: the U-Net (encoder in BACKBONE_REGISTRY,
full-resolution head in SEM_SEG_HEADS_REGISTRY), ImageNet-pretrained MobileNetV2 backbones (FPN for Mask R-CNN,
U-Net encoder) and helpers of a ``SemanticSegmentor`` built on them."""
from mmt_psm.networks import mobilenet, unet  # noqa: F401  (registration by import)
