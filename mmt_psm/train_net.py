r"""Train or evaluate a cell/organ segmentation model with Detectron2's usual command line (``tools/train_net.py``
and ``python -m mmt_psm.train_net`` run this module).

    python tools/train_net.py --config-file configs/mmt_psm_R50.yaml --num-gpus 4
    python tools/train_net.py --config-file configs/supervised_R50.yaml --eval-only MODEL.WEIGHTS out/model_final.pth

Flags are Detectron2's (`--num-machines`, `--machine-rank`, `--dist-url`, `--resume`, `--eval-only`,
trailing `KEY VALUE` overrides). Importing ``mmt_psm`` registers the data sets, models and evaluators. Your own
data needs no Python: ``DATASETS.REGISTER`` entries ("name:instances.json:image_root", "name:folder-or-glob")
are registered in ``setup`` (in every process), before the Trainer is built, e.g.

    python tools/train_net.py --config-file configs/mmt_psm_R50.yaml \
        DATASETS.REGISTER '("cells_train:data/train.json:data/images", "cells_test:data/test.json:data/images",
                            "cells_unl:data/unlabeled")' DATASETS.TRAIN '("cells_train",)' \
        DATASETS.TEST '("cells_test",)' DATASETS.TRAIN_UNLABELED '("cells_unl",)' DATASETS.SPLIT_FILE '""' \
        MODEL.ROI_HEADS.NUM_CLASSES 1

The shipped configs set no ``MODEL.DEVICE``: training runs on CUDA where there is a GPU and falls back to the CPU
(one warning, AMP off) where there is none; ``MODEL.DEVICE cuda`` on the command line without CUDA is an error
(``mmt_psm.core.device``). ``SEMI.IMS_PER_BATCH_*`` are per GPU (the Trainer logs per-GPU and total images per step).

``TEST.AUG.ENABLED True`` adds Detectron2's test-time augmentation (results suffixed ``_TTA``). ``--eval-only``
also writes the flattened results (``task/metric``) to ``OUTPUT_DIR/eval_results.json``. On POSIX, a running
training takes one more CPU thread on ``SIGUSR1`` (``kill -USR1 PID``; ``tools/quickstart.py`` sends it when a core
frees up) and gives one back on ``SIGUSR2``.
"""
from __future__ import annotations

import os

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup, hooks, launch
from detectron2.evaluation import verify_results
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import mmt_psm  # noqa: F401  (registers everything)
from mmt_psm.config import load_config
from mmt_psm.core import Trainer
from mmt_psm.core.atomic import write_json
from mmt_psm.core.checkpoint import AtomicCheckpointer
from mmt_psm.core.threads import install_thread_signal
from mmt_psm.instance.user_datasets import register_datasets_from_config
from mmt_psm.networks.mobilenet import check_pretrained_weights


def setup(args) -> CfgNode:
    """Build the frozen config from ``--config-file`` and overrides, and set up logging and the output dir."""
    # the device resolved against this machine: no CUDA -> the CPU with a warning, except for a CUDA device asked
    # for on the command line (an error); AMP off on the CPU (mmt_psm.core.device)
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    check_pretrained_weights(cfg.MODEL.WEIGHTS)  # a missing local file names the set-up tool that writes it
    default_setup(cfg, args)
    # this project's loggers (e.g. the cell-metrics table), as Detectron2's projects do
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mmt_psm")
    # DATASETS.REGISTER (your own data), and NUM_CLASSES against every data set whose classes are known now
    register_datasets_from_config(cfg)
    return cfg


def main(args):
    """Train (or with ``--eval-only`` evaluate) in this process; what ``launch`` runs on every rank."""
    install_thread_signal()  # SIGUSR1 / SIGUSR2: one more / one fewer CPU thread (tools/quickstart.py)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
            # the flattened "task/metric" values (as metrics.json holds them after training), for scripts
            write_json(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), flatten_results_dict(res))
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:  # as Detectron2's tools/train_net.py: TTA after the last iteration
        trainer.register_hooks([hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))])
    return trainer.train()


def argument_parser():
    """Detectron2's ``default_argument_parser`` with a description saying what a run writes."""
    parser = default_argument_parser()
    parser.description = (
        "Train or evaluate a cell/organ segmentation model with Detectron2's usual command line. Writes to the "
        "config's OUTPUT_DIR (a trailing 'OUTPUT_DIR DIR' override sets it): checkpoints model_*.pth and "
        "last_checkpoint, config.yaml, log.txt, metrics.json, TensorBoard events, evaluation results (with "
        "--eval-only: eval_results.json).")
    return parser


def cli() -> None:
    """Parse Detectron2's command line and ``launch`` :func:`main` on every GPU / machine."""
    args = argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
