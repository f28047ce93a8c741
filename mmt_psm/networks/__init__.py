"""Networks shared by tasks, registered with Detectron2 by import: the U-Net (encoder in BACKBONE_REGISTRY,
full-resolution head in SEM_SEG_HEADS_REGISTRY) and helpers of a ``SemanticSegmentor`` built on it."""
from mmt_psm.networks import unet  # noqa: F401  (registration by import)
