"""Models: the MMT-PSM meta-architecture and its parts (EMA, ramps, views, mining, distillation losses)."""
from .mmt_psm_rcnn import MMTPSMRCNN

__all__ = ["MMTPSMRCNN"]
