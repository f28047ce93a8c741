"""Label-efficient cell and organ segmentation on Detectron2 (MMT-PSM and semantic siblings).

Importing this package registers its data sets, meta-architectures, unlabeled-image mappers and evaluators
with Detectron2 (registration by import, as in Detectron2's projects).
"""
from . import data, evaluation, modeling  # noqa: F401  (registration by import)
from .config import add_mmt_psm_config
from .data import semantic_mapper, view_mapper  # noqa: F401  (register the unlabeled mappers)

__version__ = "0.1.0"
__all__ = ["add_mmt_psm_config"]
