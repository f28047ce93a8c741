"""Network code shared by the project's models: backbones registered with Detectron2 on import
(``build_mobilenet_v2_fpn_backbone``, ``build_mobilenet_v2_unet_backbone``)."""
from . import mobilenet  # noqa: F401
