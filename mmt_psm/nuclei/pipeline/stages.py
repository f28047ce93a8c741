"""PSM stages 1-3 and 5 as resumable folder-to-folder steps (run by ``tools/psm_stage.py`` and
``tools/psm_pipeline.py``).

Every stage takes a list of image records (``label_files.resolve_images``: a folder of H&E tiles or a registered
data set), writes one file per image under a label folder, skips files that already exist (so a killed run
resumes), prints one progress line per image, and keeps the folder's ``index.json`` (read by
:func:`mmt_psm.nuclei.datasets.load_psm_index`) up to date. Layout of a label folder::

    self_sup.pth            stage 1 network
    activation/<stem>.png   stage 2 self-activation map (uint8, 255 = 1.0)
    pseudo/<stem>.png       stage 3 pseudo mask (0/1)
    probability/<stem>.png  detection-network foreground probability (uint8, 255 = 1.0; from ``predict``)
    voronoi/<stem>.png      stage 5 labels (0 background, 1 nucleus, 255 ignore)
    points/<stem>.json      stage 5 points (row, col)
    refined/<stem>.png      optional stage 5b mask from the probability (0, 1, 255 ignore); when present it is
                            the pseudo-mask label stage 6 trains on (``PSM.REFINE``)
Ground-truth labels never enter a label-free folder: quality against them is scored separately. The one
exception is the supervised upper bound (``ground_truth.run_supervised_labels``), which writes ``pseudo/`` and
``voronoi/`` from instance maps into a folder of its own, marked by ``ground_truth_labels.json``; the label-free
stages refuse such a folder and it refuses a label-free one.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List

import numpy as np
import torch
from detectron2.config import CfgNode
from torch import nn

from mmt_psm.core.atomic import save_torch, write_image, write_json
from mmt_psm.nuclei.haematoxylin import haematoxylin_mask
from mmt_psm.nuclei.pipeline.label_files import (
    Log,
    each_missing,
    print_progress,
    read_unit_map,
    refuse_gt_folder,
    update_index,
    write_label,
    write_unit_map,
)
from mmt_psm.nuclei.pseudo_masks import pseudo_mask
from mmt_psm.nuclei.self_activation import self_activation_map
from mmt_psm.nuclei.self_supervised import build_self_supervised_net, train_self_supervised
from mmt_psm.nuclei.tile_io import read_he_image
from mmt_psm.nuclei.voronoi import detect_points, voronoi_labels

__all__ = ["run_self_supervised", "run_activation", "run_pseudo_masks", "run_voronoi", "refined_mask",
           "run_refined_masks"]

def run_self_supervised(images: List[Dict], folder: str, cfg: CfgNode, log: Log = print_progress,
) -> nn.Module:
    """Stage 1: train (or load ``folder/self_sup.pth``) the rot180-consistency network ``PSM.SELF_SUP.ENCODER``
    names on the images, on ``cfg.MODEL.DEVICE`` (resolved by ``load_config``: the CPU where CUDA is missing); the
    network returned is on that device (stage 2 computes its activation maps there)."""
    refuse_gt_folder(folder)
    s = cfg.PSM.SELF_SUP
    device = torch.device(cfg.MODEL.DEVICE)
    path = os.path.join(folder, "self_sup.pth")
    if os.path.isfile(path):
        net = build_self_supervised_net(cfg, pretrained=False)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu"))
        except RuntimeError as e:
            raise ValueError(f"{path} holds another stage-1 network than PSM.SELF_SUP.ENCODER {s.ENCODER!r} "
                             "builds: set the ENCODER it was trained with, or remove it and activation/") from e
        log(f"[psm stage 1] loaded {path}")
        return net.to(device).eval()
    os.makedirs(folder, exist_ok=True)
    pixels = [read_he_image(r["file_name"]) for r in images]
    start = time.perf_counter()
    net = train_self_supervised(pixels, s.ITERS, s.CROP, s.BATCH, s.LR, tuple(s.CHANNELS), seed=cfg.SEED % 2**31,
                                progress=lambda i, v: log(f"[psm stage 1] iter {i}/{s.ITERS} L1 {v:.4f}"),
                                device=device, build=lambda: build_self_supervised_net(cfg))
    save_torch(path, net.state_dict())
    log(f"[psm stage 1] trained in {time.perf_counter() - start:.0f} s -> {path}")
    return net


def run_activation(images: List[Dict], folder: str, cfg: CfgNode, log: Log = print_progress,
) -> None:
    """Stages 1-2: self-activation maps ``activation/<stem>.png``."""
    refuse_gt_folder(folder)
    out = os.path.join(folder, "activation")
    if all(os.path.isfile(os.path.join(out, r["stem"] + ".png")) for r in images):
        log("[psm stage 2] all activation maps exist")
        return
    net = run_self_supervised(images, folder, cfg, log)
    for _, r, path in each_missing(images, out, "stage 2", log):
        write_unit_map(path, self_activation_map(net, read_he_image(r["file_name"]), cfg.PSM.ACTIVATION_TILE))


def run_pseudo_masks(images: List[Dict], folder: str, cfg: CfgNode, log: Log = print_progress,
) -> None:
    """Stage 3: pseudo masks ``pseudo/<stem>.png`` from the images and their activation maps."""
    refuse_gt_folder(folder)
    p = cfg.PSM.PSEUDO_MASK
    if p.METHOD not in ("kmeans", "haematoxylin"):
        raise ValueError(f"PSM.PSEUDO_MASK.METHOD must be 'kmeans' or 'haematoxylin', got {p.METHOD!r}")
    for _, r, path in each_missing(images, os.path.join(folder, "pseudo"), "stage 3", log):
        act = read_unit_map(os.path.join(folder, "activation", r["stem"] + ".png"))
        image = read_he_image(r["file_name"])
        if p.METHOD == "haematoxylin":
            mask = haematoxylin_mask(image, act, p.H_SIGMA, p.ACT_WEIGHT, p.MIN_OBJECT_SIZE, p.MAX_HOLE_SIZE,
                                     p.MIN_H_RANGE)
        else:
            mask = pseudo_mask(image, act, p.K, p.BETA, p.MIN_OBJECT_SIZE, p.MAX_HOLE_SIZE, p.KMEANS_SAMPLE,
                               seed=cfg.SEED % 2**31, prior=p.PRIOR, min_contrast=p.MIN_CONTRAST)
        if not mask.any():
            log(f"[psm stage 3] warning: {r['file_name']} has no foreground in its pseudo mask")
        write_label(path, mask)
    update_index(folder, images)


def run_voronoi(images: List[Dict], folder: str, cfg: CfgNode, log: Log = print_progress,
) -> None:
    """Stage 5: points and Voronoi labels from ``probability/<stem>.png`` (the detection network's output)."""
    refuse_gt_folder(folder)
    pt = cfg.PSM.POINTS
    for _, r, path in each_missing(images, os.path.join(folder, "voronoi"), "stage 5", log):
        prob = read_unit_map(os.path.join(folder, "probability", r["stem"] + ".png"))
        points = detect_points(prob, pt.SIGMA, pt.MIN_DISTANCE, pt.THRESHOLD)
        write_json(os.path.join(folder, "points", r["stem"] + ".json"), points.tolist(), indent=None)
        write_label(path, voronoi_labels(points, prob.shape, pt.RADIUS))
    update_index(folder, images)


def _check_band(fg: float, bg: float) -> None:
    if not 0.0 <= bg < fg <= 1.0:
        raise ValueError(f"PSM.REFINE: need 0 <= BG < FG <= 1, got BG {bg}, FG {fg}")


def refined_mask(prob: np.ndarray, fg: float, bg: float, ignore_value: int = 255) -> np.ndarray:
    """HxW uint8 label of a foreground probability: 1 where ``prob >= fg``, 0 where ``prob <= bg``, else
    ``ignore_value`` (the uncertain band the loss skips)."""
    _check_band(fg, bg)
    out = np.full(prob.shape, ignore_value, np.uint8)
    out[prob >= fg] = 1
    out[prob <= bg] = 0
    return out


def run_refined_masks(images: List[Dict], folder: str, cfg: CfgNode, log: Log = print_progress,
) -> None:
    """Stage 5b with ``PSM.REFINE.ENABLED``: ``refined/<stem>.png`` from ``probability/<stem>.png``; the index then
    names them as the pseudo masks, so stage 6 trains on the detection network's confident pixels rather than on
    the stage-3 masks. Without the switch a folder holding refined masks is an error (stage 6 would train on
    them)."""
    refuse_gt_folder(folder)
    r5 = cfg.PSM.REFINE
    out = os.path.join(folder, "refined")
    if not r5.ENABLED:
        if os.path.isdir(out) and os.listdir(out):
            raise ValueError(f"{out} holds refined pseudo masks (a PSM.REFINE.ENABLED run) that stage 6 would train "
                             "on: remove that folder or set PSM.REFINE.ENABLED True")
        return
    _check_band(r5.FG, r5.BG)  # a bad band fails before any file is written
    for _, r, path in each_missing(images, out, "stage 5b", log):
        prob = read_unit_map(os.path.join(folder, "probability", r["stem"] + ".png"))
        write_image(path, refined_mask(prob, r5.FG, r5.BG, int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)))
    update_index(folder, images)
