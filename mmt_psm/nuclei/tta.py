"""Dihedral test-time augmentation for the PSM networks' foreground probability.

Nuclei have no preferred orientation, so the 8 rot90 / flip views of a tile are equally valid inputs; averaging
the foreground probability over them (each mapped back to the original frame) is the usual nuclei TTA
(``PSM.TEST.TTA``). A network that is exactly equivariant gives the same map with and without it.
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["dihedral_views", "dihedral_probability"]


def dihedral_views() -> Iterator[Tuple[int, bool]]:
    """The 8 elements of the dihedral group as (quarter turns k, horizontal flip after the turn)."""
    for k in range(4):
        for flip in (False, True):
            yield k, flip


def _forward_view(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, dims=(-2, -1))
    return x.flip(-1) if flip else x


def _inverse_view(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, -k, dims=(-2, -1))


@torch.no_grad()
def dihedral_probability(model: nn.Module, inputs: Dict) -> np.ndarray:
    """(H, W) float32 mean over the 8 views of the softmax probability of class 1, in ``inputs``' frame.

    ``inputs`` is a Detectron2 input dict (``image`` CHW, ``height``, ``width``) of a model whose output
    ``sem_seg`` is (C, height, width) logits, as ``SemanticSegmentor`` returns."""
    total = None
    h, w = int(inputs.get("height", inputs["image"].shape[-2])), int(inputs.get("width", inputs["image"].shape[-1]))
    for k, flip in dihedral_views():
        vh, vw = (w, h) if k % 2 else (h, w)
        view = {**inputs, "image": _forward_view(inputs["image"], k, flip), "height": vh, "width": vw}
        prob = model([view])[0]["sem_seg"].float().softmax(dim=0)[1]
        back = _inverse_view(prob, k, flip)
        total = back if total is None else total + back
    return (total / 8.0).cpu().numpy().astype(np.float32)
