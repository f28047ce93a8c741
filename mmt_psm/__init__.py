"""Label-efficient cell and organ segmentation on Detectron2.

One package per task around a shared core, as Detectron2's projects are laid out:
- ``mmt_psm.core``: the teacher-student core every method uses (``SEMI.*`` keys, the Trainer and the
  registries tasks contribute to, EMA teacher, ramps, two-stream loader, splits, checkpoints, image reading);
- ``mmt_psm.networks``: networks shared by tasks (the U-Net and its ``SemanticSegmentor`` helpers);
- ``mmt_psm.instance``: cells, Mask R-CNN and MMT-PSM (Zhou et al., MICCAI 2020);
- ``mmt_psm.semantic``: cardiac MRI, mixed supervision (Dolz et al. / Liu et al.) and the LCC mean teacher
  (Gao & Yu);
- ``mmt_psm.nuclei``: label-free nuclei, PSM prior self-activation (Chen et al., MICCAI 2023).

Importing this package registers every task's data sets, meta-architectures, mappers, evaluators and hooks
with Detectron2 and the core (registration by import).
"""
from mmt_psm import core, instance, networks, nuclei, semantic  # noqa: F401  (registration by import)
from mmt_psm.config import add_mmt_psm_config, load_config

__version__ = "0.1.0"
__all__ = ["add_mmt_psm_config", "load_config"]
