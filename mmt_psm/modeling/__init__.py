"""Models: the teacher-student core (EMA, ramps, mixin), MMT-PSM and its parts (views, mining, distillation
losses), and the semantic siblings (U-Net, mixed supervision, LCC mean teacher)."""
from .mmt_psm_rcnn import MMTPSMRCNN
from .psm import PSMNucleiSegmentor
from .semantic import LCCMeanTeacherSegmentor, MixedSupervisionSegmentor

__all__ = ["MMTPSMRCNN", "LCCMeanTeacherSegmentor", "MixedSupervisionSegmentor", "PSMNucleiSegmentor"]
