#!/usr/bin/env python
r"""Pseudo-label quality of a trained run's teacher (or student) on held-back labeled images, per class and score
threshold: what the pseudo-label monitor logs during training, measured afterwards on many crops of a checkpoint.

    python tools/pseudo_label_quality.py output/isbi_protocol/mmt_psm_seed1 --crops 24
    python tools/pseudo_label_quality.py RUN_DIR --gt isbi2015_train --split datasets/splits/...json \
        --thresholds 0.05 0.3 0.5 0.7 --which student

Your own data (a run of tools/own_data_protocol.py or the README's own-data command): ``--gt`` takes a
``DATASETS.REGISTER`` entry of the COCO file that labels every training image, and ``--exclude-labeled`` drops
the run's labeled training images (matched by file path), leaving the images the run used unlabeled:

    python tools/pseudo_label_quality.py output/own_data_protocol/mmt_psm_plus_seed1 \
        --gt all_train:data/train/instances_train.json:data/train/images --exclude-labeled

Images: the ``--gt`` data set's images that the run's split file left unlabeled (``--split``, default the run's
``DATASETS.SPLIT_FILE``; all of ``--gt`` without one; ``--exclude-labeled`` also drops every image of the run's
``DATASETS.TRAIN``), each seen through the run's own unlabeled-view mapper
(crop, resize, flip, photometric views; numpy seeded by ``--seed``), round-robin for ``--crops`` views. The model
predicts on teacher view 0, exactly where training takes its pseudo-labels. Matching: one-to-one at mask IoU > 0.5
against the ground truth mapped into the view (objects cropped away are dropped).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional

import numpy as np
import torch

from mmt_psm.core.cli import add_output_argument


def measure(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    """``{"<class>@<t>": {precision, recall, matched_iou, per_image}}`` over the crops."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.modeling import build_model

    import mmt_psm  # noqa: F401  (registers data sets and models)
    from mmt_psm.config import load_config
    from mmt_psm.core.registry import register_config_datasets
    from mmt_psm.core.splits import load_split
    from mmt_psm.instance.pseudo_label_monitor import gt_masks_in_view, match_counts
    from mmt_psm.instance.user_datasets import register_user_dataset
    from mmt_psm.instance.view_mapper import MMTPSMViewMapper

    cfg = load_config(os.path.join(args.run_dir, "config.yaml"))
    cfg.MODEL.DEVICE = "cpu" if not torch.cuda.is_available() else cfg.MODEL.DEVICE
    if cfg.MODEL.META_ARCHITECTURE != "MMTPSMRCNN":
        raise ValueError(f"{args.run_dir}: a teacher-student (MMTPSMRCNN) run is needed, got "
                         f"{cfg.MODEL.META_ARCHITECTURE}")
    model = build_model(cfg).eval()
    weights = os.path.join(args.run_dir, "model_final.pth")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} does not exist: the run has not finished")
    DetectionCheckpointer(model).load(weights)
    net = model.teacher if args.which == "teacher" else model.student
    register_config_datasets(cfg)  # the run's own DATASETS.REGISTER entries (its labeled set, for --exclude-labeled)
    gt_name = register_user_dataset(args.gt) if ":" in args.gt else args.gt
    records = DatasetCatalog.get(gt_name)
    split_file = args.split if args.split is not None else cfg.DATASETS.SPLIT_FILE
    if split_file:
        held_back = set(load_split(split_file)["unlabeled_ids"])
        records = [r for r in records if r["image_id"] in held_back]
    if args.exclude_labeled:
        labeled = {os.path.realpath(r["file_name"]) for name in cfg.DATASETS.TRAIN for r in DatasetCatalog.get(name)}
        records = [r for r in records if os.path.realpath(r["file_name"]) not in labeled]
    if not records:
        raise ValueError(f"no held-back images of {gt_name} (split {split_file!r}, exclude labeled: "
                         f"{bool(args.exclude_labeled)})")
    classes = list(MetadataCatalog.get(gt_name).get("thing_classes"))
    mapper = MMTPSMViewMapper(cfg)
    totals = {(c, t): {"tp": 0.0, "num_pred": 0.0, "num_gt": 0.0, "iou_sum": 0.0}
              for c in range(len(classes)) for t in args.thresholds}
    np.random.seed(args.seed)
    for i in range(args.crops):
        rec = records[i % len(records)]
        view = mapper({k: v for k, v in rec.items() if k != "annotations"})
        gt, gt_cls = gt_masks_in_view(rec, view)
        with torch.no_grad():
            inst = net([{"image": view["teacher_views"][0], "height": view["height"],
                         "width": view["width"]}])[0]["instances"].to("cpu")
        pred, cls, score = inst.pred_masks.numpy().astype(bool), inst.pred_classes.numpy(), inst.scores.numpy()
        for (c, t), tot in totals.items():
            for k, v in match_counts(gt[gt_cls == c], pred[(cls == c) & (score >= t)]).items():
                tot[k] += v
    out = {}
    for (c, t), tot in totals.items():
        out[f"{classes[c]}@{t:g}"] = {
            "precision": tot["tp"] / tot["num_pred"] if tot["num_pred"] else 1.0,
            "recall": tot["tp"] / tot["num_gt"] if tot["num_gt"] else 1.0,
            "matched_iou": tot["iou_sum"] / tot["tp"] if tot["tp"] else 0.0,
            "pseudo_labels_per_crop": tot["num_pred"] / args.crops,
            "objects_per_crop": tot["num_gt"] / args.crops,
            "images": len(records),
        }
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    """Measure, print a table, write ``--output`` (default ``<run_dir>/pseudo_label_quality_<which>.json``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--gt", default="isbi2015_train", help="labeled data set holding the held-back images: a "
                   "registered name or a DATASETS.REGISTER entry name:instances.json:image_root")
    p.add_argument("--exclude-labeled", action="store_true",
                   help="drop the images of the run's DATASETS.TRAIN (its labeled images) from --gt")
    p.add_argument("--split", default=None, help="split file (default: the run's DATASETS.SPLIT_FILE)")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher")
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.05, 0.3, 0.5, 0.7])
    p.add_argument("--crops", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    add_output_argument(p, "JSON file for the table and the arguments (default "
                        "<run_dir>/pseudo_label_quality_<which>.json)", metavar="FILE")
    args = p.parse_args(argv)
    result = measure(args)
    n = next(iter(result.values()))["images"] if result else 0
    print(f"{args.which} of {args.run_dir}, {args.crops} views of {n} held-back {args.gt} images:")
    print("| class@score | precision | recall | matched IoU | pseudo-labels / view | objects / view |")
    print("|---|---|---|---|---|---|")
    for k, r in result.items():
        print(f"| {k} | {r['precision']:.2f} | {r['recall']:.2f} | {r['matched_iou']:.2f} | "
              f"{r['pseudo_labels_per_crop']:.1f} | {r['objects_per_crop']:.1f} |")
    out = args.output or os.path.join(args.run_dir, f"pseudo_label_quality_{args.which}.json")
    with open(out, "w") as f:
        json.dump({"args": vars(args), "result": result}, f, indent=1)
    return result


if __name__ == "__main__":
    main()
