"""Where a run computes: ``MODEL.DEVICE`` resolved against the machine.

The shipped configs pin no device, so Detectron2's default (``cuda``) applies. :func:`resolve_device` is the one
place that turns it into something this machine can run; every entry point goes through it:
``mmt_psm.config.load_config`` (``tools/train_net.py``, ``tools/psm_*.py``, the quickstart, every tool that reads a
config) and the :class:`~mmt_psm.core.trainer.Trainer` (configs built in Python with ``get_cfg()``).

- ``MODEL.DEVICE`` ``cuda``/``cuda:N`` without a usable CUDA device: the run falls back to the CPU, with one
  warning saying so. The exception is a CUDA device asked for on the command line (a ``MODEL.DEVICE cuda``
  override): that request is explicit, so it is an error rather than a silent CPU run.
- ``SOLVER.AMP.ENABLED`` on a non-CUDA device: off, with one warning (Detectron2 v0.6's ``AMPTrainer`` needs CUDA).
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from detectron2.config import CfgNode

__all__ = ["requested_device", "resolve_device"]

logger = logging.getLogger(__name__)


def requested_device(opts: Optional[Sequence[str]]) -> Optional[str]:
    """The ``MODEL.DEVICE`` a ``KEY VALUE`` override list sets (the last one wins), or None."""
    opts = list(opts or [])
    found = None
    for key, value in zip(opts[0::2], opts[1::2]):
        if key == "MODEL.DEVICE":
            found = str(value)
    return found


def resolve_device(cfg: CfgNode, requested: Optional[str] = None) -> CfgNode:
    """In place on an unfrozen ``cfg`` (returned): a CUDA ``MODEL.DEVICE`` without CUDA becomes ``cpu`` (one
    warning), AMP is switched off on a non-CUDA device (one warning). ``requested``: the device the user named on
    the command line; a CUDA one that this machine lacks raises ``RuntimeError``. Idempotent."""
    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda") and not torch.cuda.is_available():
        if requested is not None and str(requested).startswith("cuda"):
            raise RuntimeError(
                f"MODEL.DEVICE {requested!r} was asked for on the command line but no CUDA device is available "
                "(torch.cuda.is_available() is False); leave MODEL.DEVICE out to run on the CPU"
            )
        logger.warning(f"MODEL.DEVICE is {device!r} but no CUDA device is available: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    if cfg.SOLVER.AMP.ENABLED and not str(cfg.MODEL.DEVICE).startswith("cuda"):
        logger.warning(f"SOLVER.AMP.ENABLED needs CUDA; training in fp32 on {cfg.MODEL.DEVICE!r}")
        cfg.SOLVER.AMP.ENABLED = False
    return cfg
