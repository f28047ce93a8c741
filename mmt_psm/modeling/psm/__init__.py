"""PSM (Chen et al., MICCAI 2023): label-free nuclei segmentation from prior self-activation maps.

Stages 1-3 and 5 are functions used by the ``tools/psm_*.py`` tools (self-supervised net, Grad-CAM map,
k-means or haematoxylin pseudo masks, points + Voronoi labels); stages 4 and 6 are :class:`PSMNucleiSegmentor`.
"""
from .psm_segmentor import PSMNucleiSegmentor

__all__ = ["PSMNucleiSegmentor"]
