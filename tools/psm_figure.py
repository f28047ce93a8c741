#!/usr/bin/env python
r"""Side-by-side PNGs of PSM predictions and ground truth (the figures of docs/nuclei.md).

    python tools/psm_figure.py --pred output/psm_h_seedm1/predictions --images monuseg_test \
        --stems TCGA-ZF-A9R5-01A-01-TS1 TCGA-HT-8564-01Z-00-DX1 --crop 320 --output docs/psm

Each figure: the centre ``--crop`` x ``--crop`` window of the image with the predicted instances' contours
(yellow, left) and the ground truth's (green, right), the image's AJI from ``PRED/metrics.json`` in the title
strip when present. ``--pred`` is a ``tools/psm_pipeline.py`` / ``psm_stage.py predict`` output folder
(``instances/<stem>.png``); ``--images`` a folder of tiles or a registered data set; ``--gt`` (default: the
data set of ``--images``) a folder of instance maps ``<stem>.png`` or a registered data set with them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import cv2
import numpy as np

import mmt_psm  # noqa: F401  (registers the data sets)
from mmt_psm.core.atomic import write_image
from mmt_psm.core.cli import add_output_argument
from mmt_psm.nuclei.pipeline.label_files import resolve_images
from mmt_psm.nuclei.pipeline.predict import contour_overlay
from mmt_psm.nuclei.tile_io import read_he_image

PRED_BGR, GT_BGR = (0, 255, 255), (0, 200, 0)


def centre_crop(a: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size`` x ``size`` window (the whole image where it is smaller)."""
    h, w = a.shape[:2]
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return a[y:y + size, x:x + size]


def figure(image_rgb: np.ndarray, pred: np.ndarray, gt: np.ndarray, crop: int, title: str = "") -> np.ndarray:
    """HxW'x3 BGR: prediction contours | 4-pixel white gap | ground-truth contours, under a 24-pixel title strip."""
    if not (image_rgb.shape[:2] == pred.shape == gt.shape):
        raise ValueError(f"image {image_rgb.shape[:2]}, prediction {pred.shape} and ground truth {gt.shape} differ")
    img, p, g = (centre_crop(a, crop) for a in (image_rgb, pred, gt))
    left, right = contour_overlay(img, p, PRED_BGR), contour_overlay(img, g, GT_BGR)
    gap = np.full((img.shape[0], 4, 3), 255, np.uint8)
    body = np.concatenate([left, gap, right], axis=1)
    strip = np.full((24, body.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, title, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, body], axis=0)


def per_image_aji(pred_dir: str) -> Dict[str, float]:
    path = os.path.join(pred_dir, "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {r["stem"]: r["AJI"] for r in json.load(f).get("per_image", []) if "AJI" in r}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, help="prediction folder with instances/<stem>.png")
    p.add_argument("--images", required=True, help="folder of tiles or registered data set")
    p.add_argument("--gt", default="", help="instance-map folder or data set (default: --images)")
    p.add_argument("--stems", nargs="+", required=True)
    p.add_argument("--crop", type=int, default=320)
    add_output_argument(p, "folder for the figures, one <stem>.png per --stems", required=True)
    a = p.parse_args(argv)
    gt_source = a.gt or a.images
    records = {r["stem"]: r for r in resolve_images(a.images, gt_source)}
    aji = per_image_aji(a.pred)
    for stem in a.stems:
        if stem not in records or "instance_file_name" not in records[stem]:
            raise FileNotFoundError(f"{a.images} / {gt_source} have no image with instance labels named {stem}")
        r = records[stem]
        pred_path = os.path.join(a.pred, "instances", stem + ".png")
        pred = cv2.imread(pred_path, cv2.IMREAD_UNCHANGED)
        if pred is None:
            raise FileNotFoundError(f"{pred_path}: missing or unreadable prediction")
        gt = cv2.imread(r["instance_file_name"], cv2.IMREAD_UNCHANGED)
        title = f"{stem}: prediction (yellow) | ground truth (green)"
        if stem in aji:
            title += f", image AJI {aji[stem]:.3f}"
        out = os.path.join(a.output, stem + ".png")
        write_image(out, figure(read_he_image(r["file_name"]), pred, gt, a.crop, title))
        print(out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
