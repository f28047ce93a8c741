"""Cardiac MRI: mixed supervision (Dolz et al., IPMI 2021; Liu et al., MedIA 2023) and the LCC mean teacher
(Gao & Yu, ISBP 2023) on a U-Net ``SemanticSegmentor``, ACDC data and volume evaluation (3D Dice, HD95).

Importing registers both meta-architectures, the ``semantic_slice`` mapper (labeled and weak images), the
``sem_seg_volume`` evaluator and the built-in ACDC data sets.
"""
from mmt_psm.semantic import slice_mapper, volume_evaluator  # noqa: F401  (registration by import)
from mmt_psm.semantic.acdc_datasets import register_all_acdc
from mmt_psm.semantic.config import add_semantic_config
from mmt_psm.semantic.lcc_mean_teacher import LCCMeanTeacherSegmentor
from mmt_psm.semantic.mixed_supervision import MixedSupervisionSegmentor

register_all_acdc()

__all__ = ["LCCMeanTeacherSegmentor", "MixedSupervisionSegmentor", "add_semantic_config"]
