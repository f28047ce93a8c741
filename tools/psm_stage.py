#!/usr/bin/env python
"""PSM label tools: one stage at a time, folder (or registered data set) in, label folder out, resumable.

    python tools/psm_stage.py activation   --images DIR|DATASET --labels LABELS       # stages 1-2
    python tools/psm_stage.py pseudo-masks --images DIR|DATASET --labels LABELS       # stage 3
    python tools/psm_stage.py voronoi      --images ... --labels LABELS --weights detection/model_final.pth
                                           # stage 5: detection-net probabilities -> points -> Voronoi labels
                                           # (+ refined masks from them with PSM.REFINE.ENABLED True)
    python tools/psm_stage.py predict      --images ... --output OUT --weights segmentation/model_final.pth
                                           # instances (uint16 PNG), COCO results JSON, overlays, metrics
    python tools/psm_stage.py pseudo-instances --images ... --labels LABELS --output OUT
                                           # the same outputs from the stage-3 pseudo masks (a baseline)
    python tools/psm_stage.py supervised-labels --images ... --gt DIR|DATASET --labels LABELS_GT
                                           # supervised upper bound: pseudo/ + voronoi/ from GT instance maps
``--gt DIR|DATASET`` (instance maps, e.g. monuseg_train_labels_for_eval) only scores labels or predictions;
nothing reads it for training, except ``supervised-labels`` (a label folder of its own, marked, that the
label-free stages refuse; see ``run_supervised_labels``). ``--config-file`` (default
configs/psm/Base-PSM-UNet.yaml) and trailing ``KEY VALUE`` overrides set every stage's parameters (``PSM.*``).
The label stages write into ``--labels`` (activation/, pseudo/, probability/, voronoi/, index.json,
label_quality.json), predict and pseudo-instances into ``--output``. ``tools/psm_pipeline.py`` runs them all.
"""
from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np

import mmt_psm  # noqa: F401  (registers data sets and models)
from mmt_psm.config import load_config
from mmt_psm.core.cli import add_config_argument, add_output_argument
from mmt_psm.nuclei.pipeline.ground_truth import run_supervised_labels
from mmt_psm.nuclei.pipeline.label_files import resolve_images, update_index, write_unit_map
from mmt_psm.nuclei.pipeline.predict import predict_probabilities, score_labels, write_instances
from mmt_psm.nuclei.pipeline.stages import run_activation, run_pseudo_masks, run_refined_masks, run_voronoi

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "psm",
                              "Base-PSM-UNet.yaml")


def run(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("activation", "pseudo-masks", "voronoi", "predict", "pseudo-instances",
                                         "supervised-labels"))
    p.add_argument("--images", required=True, help="folder of H&E tiles or a registered data set name")
    p.add_argument("--labels", help="PSM label folder (activation, pseudo-masks, voronoi, supervised-labels)")
    add_output_argument(p, "predict, pseudo-instances: folder for instances/<stem>.png (uint16), probability/, "
                        "overlays/, predictions_coco.json and, with --gt, metrics.json")
    p.add_argument("--weights", help="trained model (voronoi: detection network; predict: segmentation network)")
    p.add_argument("--gt", help="instance maps to score against (folder of <stem>.png or data set)")
    add_config_argument(p, "the stages' config", default=DEFAULT_CONFIG)
    a, opts = p.parse_known_args(argv)  # the rest: KEY VALUE config overrides
    if any(o.startswith("--") for o in opts):
        p.error(f"unknown options {[o for o in opts if o.startswith('--')]}")
    # torch's own thread count (OMP_NUM_THREADS when set, else one per core); the device: MODEL.DEVICE, resolved
    # by load_config (CUDA when there is one, else the CPU)
    cfg = load_config(a.config_file, opts, freeze=True)
    images = resolve_images(a.images, a.gt)
    if a.stage in ("activation", "pseudo-masks", "voronoi", "pseudo-instances", "supervised-labels") and not a.labels:
        p.error(f"{a.stage} needs --labels")
    if a.stage in ("voronoi", "predict") and not a.weights:
        p.error(f"{a.stage} needs --weights")
    if a.stage == "activation":
        run_activation(images, a.labels, cfg)
        update_index(a.labels, images)
    elif a.stage == "pseudo-masks":
        run_pseudo_masks(images, a.labels, cfg)
        score_labels(images, a.labels)
    elif a.stage == "supervised-labels":
        run_supervised_labels(images, a.labels, a.gt or a.images)
    elif a.stage == "voronoi":
        predict_probabilities(cfg, a.weights, images, os.path.join(a.labels, "probability"))
        run_voronoi(images, a.labels, cfg)
        run_refined_masks(images, a.labels, cfg)
        score_labels(images, a.labels)
    else:
        if not a.output:
            p.error(f"{a.stage} needs --output")
        prob_dir = os.path.join(a.output, "probability")
        if a.stage == "predict":
            predict_probabilities(cfg, a.weights, images, prob_dir)
        else:  # pseudo masks (0/1) as probabilities 0/1
            os.makedirs(prob_dir, exist_ok=True)
            for r in images:
                mask = cv2.imread(os.path.join(a.labels, "pseudo", r["stem"] + ".png"), cv2.IMREAD_UNCHANGED)
                if mask is None:
                    raise FileNotFoundError(f"no pseudo mask for {r['file_name']} in {a.labels}/pseudo")
                write_unit_map(os.path.join(prob_dir, r["stem"] + ".png"), mask.astype(np.float32))
        write_instances(cfg, images, prob_dir, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(run())
