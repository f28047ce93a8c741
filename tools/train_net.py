#!/usr/bin/env python
"""Train or evaluate a cell/organ segmentation model with Detectron2's usual command line.

    python tools/train_net.py --config-file configs/mmt_psm_R50.yaml --num-gpus 4
    python tools/train_net.py --config-file configs/supervised_R50.yaml --eval-only MODEL.WEIGHTS out/model_final.pth

Flags are Detectron2's (``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``, ``--resume``,
``--eval-only``, trailing ``KEY VALUE`` overrides). It writes checkpoints, ``metrics.json``, TensorBoard events
and evaluation results to ``OUTPUT_DIR``. The code is :mod:`mmt_psm.train_net` (also ``python -m
mmt_psm.train_net``); its docstring lists your-own-data and TTA options.
"""
from mmt_psm.train_net import cli, main, setup

__all__ = ["cli", "main", "setup"]

if __name__ == "__main__":
    cli()
