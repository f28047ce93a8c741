#!/usr/bin/env python
r"""PSM end to end on a folder of H&E tiles (or a registered data set), without any label:

    python tools/psm_pipeline.py --images my_he_tiles/ --output output/psm_run
    python tools/psm_pipeline.py --images monuseg_train --test monuseg_test \
        --train-gt monuseg_train_labels_for_eval --output output/psm_monuseg       # MoNuSeg protocol

Stages: (1-2) self-supervised net + self-activation maps, (3) pseudo masks (k-means or haematoxylin), (4) detection
network (``tools/train_net.py``'s main with configs/psm/detection.yaml), (5) points + Voronoi labels (5b with
``PSM.REFINE.ENABLED``: the detection network's confident pixels replace the pseudo masks), (6) segmentation network
(configs/psm/segmentation.yaml, initialised from stage 4), then instance maps, COCO results JSON and overlays for
``--test`` (default: the training images themselves). Every stage resumes: rerun the same command after an
interruption. ``--train-gt`` only scores the labels (logged, label_quality.json); ``--test`` metrics are written
when the test set has instance maps. Trailing ``KEY VALUE`` overrides go to every stage and to train_net, and
Detectron2's launch flags (``--num-gpus`` ...) to the training stages 4 and 6. Output: OUTPUT/labels (label
folder), OUTPUT/detection, OUTPUT/segmentation (train_net dirs, each with its log.txt), OUTPUT/predictions. Each
step prints its time, the steps done / total, the time elapsed and an estimate of the time left.

Stages 1, 4 and 6 train the ImageNet MobileNetV2 encoder (configs/psm/Base-PSM-UNet.yaml; the file is written by
``python tools/prepare_pretrained.py``, which ``make setup`` runs; run from the repository root, as the path is
relative). Its weights initialise stages 1 and 4; stage 6 starts from stage 4 (from ImageNet with
``--seg-from-scratch``). The from-scratch U-Net and stage-1 ResNet by trailing overrides:
    python tools/psm_pipeline.py --images monuseg_train --test monuseg_test --output output/psm_scratch \
        MODEL.BACKBONE.NAME build_unet_backbone MODEL.WEIGHTS "" MODEL.PIXEL_MEAN "[170.0, 120.0, 165.0]" \
        MODEL.PIXEL_STD "[40.0, 45.0, 35.0]" PSM.SELF_SUP.ENCODER scratch

Supervised upper bound (``--supervised``, needs ``--train-gt``; use an ``--output`` of its own): stages 1-3 and 5 are
replaced by ``psm_stage.py supervised-labels`` (pseudo mask and Voronoi labels = the GT foreground, borders of
touching nuclei background, no ignore); stages 4 and 6, their configs, iterations, stage-4 initialisation of
stage 6 and the prediction/evaluation are PSM's own, so only the labels differ. ``--seg-from-scratch`` trains
stage 6 alone:
    python tools/psm_pipeline.py --supervised --images monuseg_train --train-gt monuseg_train_labels_for_eval \
        --test monuseg_test --output output/psm_monuseg_supervised
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from detectron2.engine import default_argument_parser, launch

import mmt_psm  # noqa: F401
from mmt_psm.config import load_config
from mmt_psm.core.cli import add_launch_arguments, add_output_argument
from mmt_psm.core.protocol import Progress
from mmt_psm.nuclei.datasets import register_psm_labels
from mmt_psm.nuclei.pipeline.ground_truth import run_supervised_labels
from mmt_psm.nuclei.pipeline.label_files import resolve_images, update_index
from mmt_psm.nuclei.pipeline.predict import predict_probabilities, score_labels, write_instances
from mmt_psm.nuclei.pipeline.stages import run_activation, run_pseudo_masks, run_refined_masks, run_voronoi
from mmt_psm.train_net import main as train_net_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(config: str, out_dir: str, labels: str, iters: int, opts, init: str = "", num_gpus: int = 1,
          num_machines: int = 1, machine_rank: int = 0, dist_url: str = "") -> str:
    """``tools/train_net.py`` (its ``main`` through Detectron2's ``launch``: in this process on one GPU or the CPU,
    one process per GPU with ``num_gpus`` > 1; ``num_machines`` / ``machine_rank`` / ``dist_url`` as train_net's
    flags, ``""``: Detectron2's default URL; ``--resume``) on the label folder registered as ``psm_labels``;
    returns the final weights. Detectron2 logs to ``out_dir/log.txt`` (printed when training starts). The same
    command line by hand:
    ``MMT_PSM_LABEL_SETS=psm_labels=LABELS python tools/train_net.py --config-file CONFIG --num-gpus N ...``."""
    final = os.path.join(out_dir, "model_final.pth")
    if os.path.isfile(final):
        print(f"[psm pipeline] {final} exists, training skipped", flush=True)
        return final
    register_psm_labels("psm_labels", labels)
    # the processes launch spawns (--num-gpus > 1) register the label folder from the environment
    # (mmt_psm.nuclei.datasets.register_all_psm)
    before = os.environ.get("MMT_PSM_LABEL_SETS")
    sets = [e for e in (before or "").split(os.pathsep) if e and not e.startswith("psm_labels=")]
    os.environ["MMT_PSM_LABEL_SETS"] = os.pathsep.join(sets + [f"psm_labels={os.path.abspath(labels)}"])
    launch_flags = ["--num-gpus", str(num_gpus), "--num-machines", str(num_machines), "--machine-rank",
                    str(machine_rank)] + (["--dist-url", dist_url] if dist_url else [])
    argv = ["--config-file", config, *launch_flags, "--resume", "OUTPUT_DIR", out_dir,
            "DATASETS.TRAIN", '("psm_labels",)', "DATASETS.TEST", "()", "SOLVER.MAX_ITER", str(iters),
            "SOLVER.CHECKPOINT_PERIOD", str(max(iters // 2, 1)), *opts]
    # the stage-4 network after the overrides: a MODEL.WEIGHTS among them (the ImageNet encoder) initialises stage 4
    # (and stage 6 with --seg-from-scratch), never stage 6 in place of stage 4
    argv += ["MODEL.WEIGHTS", init] if init else []
    print(f"[psm pipeline] MMT_PSM_LABEL_SETS=psm_labels={os.path.abspath(labels)} python tools/train_net.py "
          + " ".join(repr(a) if " " in a or "(" in a else a for a in argv), flush=True)
    print(f"[psm pipeline] training {out_dir}, log {os.path.join(out_dir, 'log.txt')}", flush=True)
    args = default_argument_parser().parse_args(argv)
    try:
        launch(train_net_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    finally:
        if before is None:
            os.environ.pop("MMT_PSM_LABEL_SETS", None)
        else:
            os.environ["MMT_PSM_LABEL_SETS"] = before
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="training images: folder or data set (labels never read)")
    add_output_argument(p, "run folder: labels/ (PSM label folder, label_quality.json), detection/ and "
                        "segmentation/ (train_net output: checkpoints, metrics.json, log.txt), predictions/ "
                        "(instances/, probability/, overlays/, predictions_coco.json, metrics.json)", required=True)
    p.add_argument("--test", help="images to segment at the end (folder or data set); default: --images")
    p.add_argument("--test-gt", help="instance maps of the --test images (folder of <stem>.png or data set)")
    p.add_argument("--train-gt", help="instance maps of the training images, ONLY to score the PSM labels")
    p.add_argument("--config-dir", default=os.path.join(REPO, "configs", "psm"))
    p.add_argument("--det-iters", type=int, default=300, help="stage-4 iterations")
    p.add_argument("--seg-iters", type=int, default=300, help="stage-6 iterations")
    p.add_argument("--seg-from-scratch", action="store_true", help="stage 6 not initialised from stage 4")
    p.add_argument("--supervised", action="store_true",
                   help="upper bound: train stages 4 and 6 on --train-gt's labels instead of PSM's")
    add_launch_arguments(p, "the training stages 4 and 6; stages 1-3, 5 and the prediction run in this process on "
                            "MODEL.DEVICE (CUDA when there is one, else the CPU), on every machine")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    a = p.parse_args(argv)
    # torch's own thread count (OMP_NUM_THREADS when set, else one per core): set OMP_NUM_THREADS to share the CPU
    start = time.perf_counter()
    det_cfg_file = os.path.join(a.config_dir, "detection.yaml")
    seg_cfg_file = os.path.join(a.config_dir, "segmentation.yaml")
    cfg = load_config(det_cfg_file, a.opts, freeze=True)
    labels = os.path.join(a.output, "labels")
    if a.supervised and not a.train_gt:
        p.error("--supervised needs --train-gt (the instance maps it trains on)")
    images = resolve_images(a.images, a.train_gt)
    timings = {}
    det_stage = not (a.supervised and a.seg_from_scratch)  # PSM's stage 5 needs the detection network
    progress = Progress((1 if a.supervised else 3) + det_stage + 2, unit="steps")  # labels, 4, 5, 6, prediction
    launch_kw = {"num_gpus": a.num_gpus, "num_machines": a.num_machines, "machine_rank": a.machine_rank,
                 "dist_url": a.dist_url}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - start - sum(timings.values()), 1)
        print(f"[psm pipeline] {name} done ({timings[name]} s)", flush=True)
        print(progress.finish(timings[name]), flush=True)

    if a.supervised:
        run_supervised_labels(images, labels, a.train_gt)
        lap("supervised labels (ground truth)")
    else:
        run_activation(images, labels, cfg)
        update_index(labels, images)
        lap("stages 1-2 (self-supervised net, activation maps)")
        run_pseudo_masks(images, labels, cfg)
        score_labels(images, labels)
        lap("stage 3 (pseudo masks)")
    det = ""
    if det_stage:
        det = train(det_cfg_file, os.path.join(a.output, "detection"), labels, a.det_iters, a.opts, **launch_kw)
        lap("stage 4 (detection network)")
    if not a.supervised:
        predict_probabilities(cfg, det, images, os.path.join(labels, "probability"))
        run_voronoi(images, labels, cfg)
        run_refined_masks(images, labels, cfg)
        score_labels(images, labels)
        lap("stage 5 (points, Voronoi labels" + (", refined masks)" if cfg.PSM.REFINE.ENABLED else ")"))
    seg = train(seg_cfg_file, os.path.join(a.output, "segmentation"), labels, a.seg_iters, a.opts,
                init="" if a.seg_from_scratch else det, **launch_kw)
    lap("stage 6 (segmentation network)")
    test = resolve_images(a.test or a.images, a.test_gt if a.test or a.test_gt else a.train_gt)
    seg_cfg = load_config(seg_cfg_file, a.opts, freeze=True)
    pred_dir = os.path.join(a.output, "predictions")
    predict_probabilities(seg_cfg, seg, test, os.path.join(pred_dir, "probability"))
    write_instances(seg_cfg, test, os.path.join(pred_dir, "probability"), pred_dir)
    lap("prediction (instances, COCO JSON, overlays)")
    print(f"[psm pipeline] total {time.perf_counter() - start:.0f} s; timings {timings}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
