"""``add_mmt_psm_config(cfg)``: every key this project adds to Detectron2's config, with defaults.

It is the core's keys plus each task's: ``mmt_psm.core.config`` (``SEMI.*``, streams, splits),
``mmt_psm.instance.config`` (``MODEL.MMT_PSM``, cell data and metrics), ``mmt_psm.networks`` (``MODEL.UNET``,
``MODEL.MOBILENET``), ``mmt_psm.semantic.config`` (``MODEL.MIXED_SUP``, ``MODEL.LCC``, slices, volumes) and
``mmt_psm.nuclei.config`` (``MODEL.PSM``, ``PSM.*``). The defaults switch nothing on: a config that only calls
this function trains a plain supervised model. Method defaults live in ``configs/*.yaml``.
"""
from __future__ import annotations

from typing import Optional, Sequence

from detectron2.config import CfgNode as CN

from mmt_psm.core.config import add_core_config
from mmt_psm.core.device import requested_device, resolve_device
from mmt_psm.instance.config import add_instance_config
from mmt_psm.networks.mobilenet import add_mobilenet_config
from mmt_psm.networks.unet import add_unet_config
from mmt_psm.nuclei.config import add_nuclei_config
from mmt_psm.semantic.config import add_semantic_config

__all__ = ["add_mmt_psm_config", "load_config"]


def add_mmt_psm_config(cfg: CN) -> None:
    """Add this project's keys to ``cfg`` in place (idempotent)."""
    add_core_config(cfg)
    add_instance_config(cfg)
    add_unet_config(cfg)
    add_mobilenet_config(cfg)
    add_semantic_config(cfg)
    add_nuclei_config(cfg)


def load_config(config_file: str, opts: Optional[Sequence[str]] = None, freeze: bool = False) -> CN:
    """Detectron2's defaults + this project's keys, ``config_file`` (with its bases) and ``KEY VALUE`` overrides
    merged, the device resolved against this machine (:func:`mmt_psm.core.device.resolve_device`: no CUDA ->
    the CPU, with a warning; a CUDA ``MODEL.DEVICE`` override in ``opts`` without CUDA is an error); frozen when
    ``freeze``."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    resolve_device(cfg, requested_device(opts))
    if freeze:
        cfg.freeze()
    return cfg
