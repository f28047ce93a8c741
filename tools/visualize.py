#!/usr/bin/env python
r"""Draw a trained model's predictions as PNGs.

    # ground truth | prediction, side by side, for a registered data set
    python tools/visualize.py --config-file configs/quickstart/mmt_psm.yaml --dataset synthetic_test \
        --output vis/ --max-images 8
    # predictions on a folder (or glob) of images; 16-bit and grayscale files are read like in training
    python tools/visualize.py --config-file configs/supervised_R50.yaml --input 'scans/*.tif' --output vis/ \
        --weights out/model_final.pth MODEL.DEVICE cuda

Weights: ``--weights``, else ``MODEL.WEIGHTS`` given as a trailing override, else ``OUTPUT_DIR/model_final.pth``
when it exists (the run's trained model: a run's config.yaml names its start as ``MODEL.WEIGHTS``), else the
config's ``MODEL.WEIGHTS``. For teacher-student
checkpoints (``MMTPSMRCNN``) ``--which`` picks the teacher (default: ``SEMI.EVAL_WITH``) or the student; plain
``GeneralizedRCNN`` checkpoints (supervised runs) work with their own config. Trailing ``KEY VALUE`` pairs
override the config. The drawing lives in :mod:`mmt_psm.instance.visualize`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import List, Optional, Sequence

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.utils.logger import setup_logger

import mmt_psm  # noqa: F401  (registers data sets and models)
from mmt_psm.config import load_config
from mmt_psm.core import Trainer
from mmt_psm.core.cli import add_config_argument, add_output_argument
from mmt_psm.instance.user_datasets import register_datasets_from_config
from mmt_psm.instance.visualize import draw_dataset_predictions, draw_image_predictions, list_images

logger = logging.getLogger("mmt_psm.visualize")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_argument(p, "config of the model (e.g. a run's config.yaml)", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", action="append", metavar="DIR_OR_GLOB",
                     help="image folder, glob pattern (quoted) or file; repeat for more")
    src.add_argument("--dataset", help="registered data set name: ground truth | prediction")
    add_output_argument(p, "folder for the PNGs, one per image (--dataset: ground truth | prediction side by "
                        "side)", required=True)
    p.add_argument("--weights", default="", help="checkpoint (default: MODEL.WEIGHTS, else OUTPUT_DIR/model_final.pth)")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw predictions with score >= this")
    p.add_argument("--max-images", type=int, default=0, help="at most this many images (0 = all)")
    p.add_argument("--which", choices=("teacher", "student"), default=None,
                   help="model of a teacher-student checkpoint to run (default: SEMI.EVAL_WITH)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def resolve_weights(flag: str, weights_on_command_line: bool, config_weights: str, output_dir: str) -> str:
    """The checkpoint to draw: ``--weights``; else ``MODEL.WEIGHTS`` given on the command line; else the run's
    ``OUTPUT_DIR/model_final.pth`` when it exists (a run's config.yaml names its START, e.g. ImageNet weights, as
    ``MODEL.WEIGHTS``: drawing that would show an untrained model); else the config's ``MODEL.WEIGHTS``."""
    final = os.path.join(output_dir, "model_final.pth")
    if flag:
        return flag
    if weights_on_command_line or not os.path.isfile(final):
        return config_weights or final
    return final


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    """Frozen config from ``--config-file`` + overrides, with ``MODEL.WEIGHTS`` resolved as documented."""
    cfg = load_config(args.config_file, args.opts)
    weights = resolve_weights(args.weights, "MODEL.WEIGHTS" in args.opts[::2], cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR)
    if not os.path.isfile(weights):
        raise SystemExit(f"checkpoint not found: {weights} (pass --weights or MODEL.WEIGHTS)")
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    register_datasets_from_config(cfg)  # DATASETS.REGISTER: --dataset may name your own data set
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    args = parse_args(argv)
    setup_logger(name="mmt_psm")
    cfg = setup_cfg(args)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    context = contextlib.nullcontext()
    if hasattr(model, "evaluate_with"):
        context = model.evaluate_with(args.which or cfg.SEMI.EVAL_WITH)
    elif args.which:
        logger.warning(f"--which {args.which} ignored: {type(model).__name__} has no teacher/student")
    with context:
        if args.dataset:
            paths = draw_dataset_predictions(
                cfg, model, args.dataset, args.output, args.max_images, args.score_thresh
            )
        else:
            images = list_images(args.input)
            if not images:
                raise SystemExit(f"no image files found in {args.input}")
            if args.max_images > 0:
                images = images[: args.max_images]
            paths = draw_image_predictions(cfg, model, images, args.output, args.score_thresh)
    print(f"wrote {len(paths)} PNGs to {args.output}")
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
