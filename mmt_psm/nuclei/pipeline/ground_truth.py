"""The supervised upper bound of PSM: stage-6 labels (``pseudo/``, ``voronoi/``) from ground-truth instance
maps, in a label folder of their own marked by ``GT_MARKER``."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import cv2
import numpy as np

from mmt_psm.core.atomic import write_json
from mmt_psm.nuclei.pipeline.label_files import (
    GT_MARKER,
    Log,
    each_missing,
    print_progress,
    update_index,
    write_label,
)
from mmt_psm.nuclei.tile_io import read_he_image, stem_of

__all__ = ["touching_borders", "supervised_labels", "run_supervised_labels"]


def touching_borders(inst: np.ndarray) -> np.ndarray:
    """HxW bool: nucleus pixels 4-adjacent to a different nucleus, i.e. a 2-pixel band (one pixel on each side)
    where two instances touch - the same band ``find_boundaries(mode="inner")`` draws between Voronoi cells."""
    band = np.zeros(inst.shape, bool)
    lo, hi, all_ = slice(None, -1), slice(1, None), slice(None)
    for a, b in (((lo,), (hi,)), ((all_, lo), (all_, hi))):
        x, y = inst[a], inst[b]
        edge = (x != y) & (x > 0) & (y > 0)
        band[a] |= edge
        band[b] |= edge
    return band


def supervised_labels(inst: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(pseudo, voronoi) uint8 label maps of an instance map, every pixel labelled (0/1, no ignore).

    ``pseudo`` = the exact GT foreground (what stage 3 estimates: a binary mask, touching nuclei merged);
    ``voronoi`` = the same foreground with :func:`touching_borders` set to background (0), following stage 5's
    convention that the border between two neighbouring nuclei is background."""
    if inst.ndim != 2:
        raise ValueError(f"instance map of shape {inst.shape}: expected HxW")
    pseudo = (inst > 0).astype(np.uint8)
    voronoi = pseudo.copy()
    voronoi[touching_borders(inst)] = 0
    return pseudo, voronoi


def run_supervised_labels(images: List[Dict], folder: str, gt_source: str = "", log: Log = print_progress,
) -> None:
    """Supervised upper bound: ``pseudo/`` and ``voronoi/`` (+ ``index.json``) from each image's GT instance map
    (``instance_file_name``, :func:`resolve_images` with ``gt``) by :func:`supervised_labels`, in the format stage
    6's training reads. Errors name the image without GT, an unreadable map or a map of another size."""
    for sub in ("activation", "probability", "points"):
        if os.path.isdir(os.path.join(folder, sub)):
            raise ValueError(f"{folder} is a label-free PSM label folder ({sub}/ exists): write the ground-truth "
                             "labels to a new folder")
    missing = [r["file_name"] for r in images if "instance_file_name" not in r]
    if missing:
        stem = stem_of(missing[0])
        expected = os.path.join(gt_source, stem + ".png") if os.path.isdir(gt_source) else f"{gt_source}: {stem}"
        more = f" (and {len(missing) - 1} more images)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"no ground-truth instance map {expected} for image {missing[0]}{more}")
    write_json(os.path.join(folder, GT_MARKER), {"ground_truth": gt_source or "instance_file_name of the images"})
    for _, r, path in each_missing(images, os.path.join(folder, "voronoi"), "supervised labels", log):
        gt_path = r["instance_file_name"]
        inst = cv2.imread(gt_path, cv2.IMREAD_UNCHANGED)
        if inst is None:
            raise OSError(f"cannot read ground-truth instance map {gt_path}")
        shape = read_he_image(r["file_name"]).shape[:2]
        if inst.shape != shape:
            raise ValueError(f"ground-truth instance map {gt_path} has size {inst.shape}, its image "
                             f"{r['file_name']} {shape}")
        pseudo, voronoi = supervised_labels(inst)
        write_label(os.path.join(folder, "pseudo", r["stem"] + ".png"), pseudo)
        write_label(path, voronoi)  # last: its presence marks the image done (resume)
    update_index(folder, images)
