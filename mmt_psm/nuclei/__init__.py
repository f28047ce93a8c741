"""Label-free nuclei: PSM, prior self-activation maps (Chen et al., MICCAI 2023; code cpystan/PSM).

Stages 1-3 and 5 are functions run by :mod:`mmt_psm.nuclei.pipeline` (self-supervised net, self-activation
map, k-means or haematoxylin pseudo masks, points + Voronoi labels); stages 4 and 6 are the registered
meta-architecture :class:`PSMNucleiSegmentor`. Importing registers it, the ``psm_nuclei`` mapper, the
``nuclei_instances`` evaluator and the built-in MoNuSeg / PSM data sets.
"""
from mmt_psm.nuclei import evaluator, mapper  # noqa: F401  (registration by import)
from mmt_psm.nuclei.config import add_nuclei_config
from mmt_psm.nuclei.datasets import register_all_psm
from mmt_psm.nuclei.segmentor import PSMNucleiSegmentor

register_all_psm()

__all__ = ["PSMNucleiSegmentor", "add_nuclei_config"]
