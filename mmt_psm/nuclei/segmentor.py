"""PSM stages 4 and 6 as one registered meta-architecture around a plain ``SemanticSegmentor``.

Training dicts carry two label maps: ``sem_seg`` (the stage-3 pseudo mask) and ``voronoi`` (stage-5 labels:
0 background, 1 nucleus, 255 ignore). The loss is

    PSEUDO_WEIGHT * CE(logits, pseudo mask) + VORONOI_WEIGHT * CE(logits, Voronoi labels)

(paper: 1 and 1.5). Stage 4 (the detection network) is the same model with ``VORONOI_WEIGHT 0`` (no Voronoi
maps needed). Inference is the inner segmentor's (``sem_seg`` logits at the original size), so a checkpoint's
``segmentor.*`` weights load into a plain Detectron2 ``SemanticSegmentor``.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage
from torch import nn

from mmt_psm.networks.segmentor import build_semantic_segmentor, images_of, segment, targets_of
from mmt_psm.networks.unet import supervised_ce

__all__ = ["PSMNucleiSegmentor", "nuclei_pseudo_label_loss"]


def nuclei_pseudo_label_loss(logits: torch.Tensor, pseudo: torch.Tensor, voronoi: torch.Tensor, pseudo_weight: float,
             voronoi_weight: float, ignore_value: int = 255) -> Dict[str, torch.Tensor]:
    """``{"loss_pseudo": w_p * CE(pseudo), "loss_voronoi": w_v * CE(voronoi)}`` (CE means over non-ignored
    pixels; an exact 0 when a map has none)."""
    return {"loss_pseudo": supervised_ce(logits, pseudo, ignore_value) * pseudo_weight,
            "loss_voronoi": supervised_ce(logits, voronoi, ignore_value) * voronoi_weight}


@META_ARCH_REGISTRY.register()
class PSMNucleiSegmentor(nn.Module):
    """A ``SemanticSegmentor`` (``segmentor``) trained on pseudo masks + Voronoi labels (PSM stages 4 and 6)."""

    @configurable
    def __init__(self, *, segmentor: nn.Module, pseudo_weight: float, voronoi_weight: float):
        super().__init__()
        self.segmentor = segmentor
        self.pseudo_weight, self.voronoi_weight = float(pseudo_weight), float(voronoi_weight)

    @classmethod
    def from_config(cls, cfg) -> dict:
        p = cfg.MODEL.PSM
        return {"segmentor": build_semantic_segmentor(cfg, p.SEGMENTOR_ARCHITECTURE), "pseudo_weight": p.PSEUDO_WEIGHT,
                "voronoi_weight": p.VORONOI_WEIGHT}

    @property
    def device(self) -> torch.device:
        return self.segmentor.device

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.segmentor(batched_inputs)
        model = self.segmentor
        images = images_of(model, batched_inputs)
        shape = tuple(images.tensor.shape[-2:])
        _, logits = segment(model, images)
        ignore = model.sem_seg_head.ignore_value
        pseudo = targets_of(model, batched_inputs, shape)
        if pseudo is None:
            raise ValueError("PSMNucleiSegmentor: training images need a pseudo mask ('sem_seg_file_name')")
        if self.voronoi_weight > 0:
            missing = [d.get("file_name", "?") for d in batched_inputs if "voronoi" not in d]
            if missing:
                raise ValueError(f"MODEL.PSM.VORONOI_WEIGHT > 0 but no Voronoi labels for {missing[:3]}: run "
                                 "stage 5 (tools/psm_stage.py voronoi) or set MODEL.PSM.VORONOI_WEIGHT 0 (stage 4)")
            vor = torch.full_like(pseudo, ignore)
            for i, d in enumerate(batched_inputs):
                v = d["voronoi"].to(pseudo.device)
                vor[i, : v.shape[0], : v.shape[1]] = v
        else:
            vor = torch.full_like(pseudo, ignore)
        losses = nuclei_pseudo_label_loss(logits, pseudo, vor, self.pseudo_weight, self.voronoi_weight, ignore)
        storage = get_event_storage()
        storage.put_scalar("psm/voronoi_labeled_fraction", float((vor != ignore).float().mean()))
        if self.voronoi_weight <= 0:
            losses.pop("loss_voronoi")
        return losses
