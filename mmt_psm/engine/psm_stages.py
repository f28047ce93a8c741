"""PSM stages 1-3 and 5 as resumable folder-to-folder steps (used by ``tools/psm_*.py``).

Every stage takes a list of image records (:func:`resolve_images`: a folder of H&E tiles or a registered data
set), writes one file per image under a label folder, skips files that already exist (so a killed run resumes),
prints one progress line per image, and keeps the folder's ``index.json`` (read by
:func:`mmt_psm.data.psm_datasets.load_psm_index`) up to date. Layout of a label folder::

    self_sup.pth            stage 1 network
    activation/<stem>.png   stage 2 self-activation map (uint8, 255 = 1.0)
    pseudo/<stem>.png       stage 3 pseudo mask (0/1)
    probability/<stem>.png  detection-network foreground probability (uint8, 255 = 1.0; from psm_predict)
    voronoi/<stem>.png      stage 5 labels (0 background, 1 nucleus, 255 ignore)
    points/<stem>.json      stage 5 points (row, col)
    refined/<stem>.png      optional stage 5b mask from the probability (0, 1, 255 ignore); when present it is
                            the pseudo-mask label stage 6 trains on (``PSM.REFINE``)
Ground-truth labels never enter a label-free folder: quality against them is scored separately. The one
exception is the supervised upper bound (:func:`run_supervised_labels`), which writes ``pseudo/`` and
``voronoi/`` from instance maps into a folder of its own, marked by ``ground_truth_labels.json``; the label-free
stages refuse such a folder and it refuses a label-free one.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode

from mmt_psm.data.psm_io import list_images, read_he_image, read_index, stem_of, write_index
from mmt_psm.modeling.psm.activation import self_activation_map
from mmt_psm.modeling.psm.haematoxylin import haematoxylin_mask
from mmt_psm.modeling.psm.pseudo_masks import pseudo_mask
from mmt_psm.modeling.psm.self_supervised import SelfSupervisedNet, train_self_supervised
from mmt_psm.modeling.psm.voronoi import detect_points, voronoi_labels
from mmt_psm.utils.atomic import save_torch, write_image, write_json

__all__ = ["resolve_images", "run_self_supervised", "run_activation", "run_pseudo_masks", "run_voronoi",
           "read_unit_map", "write_unit_map", "update_index", "load_psm_cfg", "touching_borders",
           "supervised_labels", "run_supervised_labels", "refined_mask", "run_refined_masks", "GT_MARKER"]

GT_MARKER = "ground_truth_labels.json"  # present in (only) a supervised-upper-bound label folder

Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


def resolve_images(source: str, gt: Optional[str] = None) -> List[Dict]:
    """Image records ``{file_name, stem[, instance_file_name]}`` of a folder or a registered data set name.

    ``gt``: a folder of instance maps ``<stem>.png`` or a data set with ``instance_file_name`` (only used for
    scoring, never for training)."""
    if os.path.isdir(source):
        recs = [{"file_name": f, "stem": stem_of(f)} for f in list_images(source)]
    else:
        from detectron2.data import DatasetCatalog

        if source not in DatasetCatalog.list():
            raise FileNotFoundError(f"{source!r} is neither a folder nor a registered data set")
        recs = [{"file_name": d["file_name"], "stem": stem_of(d["file_name"]),
                 **({"instance_file_name": d["instance_file_name"]} if "instance_file_name" in d else {})}
                for d in DatasetCatalog.get(source)]
        if not recs:
            raise ValueError(f"data set {source!r} is empty")
    if gt:
        by_stem = {r["stem"]: r for r in recs}
        if os.path.isdir(gt):
            for r in recs:
                path = os.path.join(gt, r["stem"] + ".png")
                if os.path.isfile(path):
                    r["instance_file_name"] = path
        else:
            for r in resolve_images(gt):
                if r["stem"] in by_stem and "instance_file_name" in r:
                    by_stem[r["stem"]]["instance_file_name"] = r["instance_file_name"]
    return recs


def write_unit_map(path: str, x: np.ndarray) -> None:
    """A [0, 1] float map as uint8 PNG (255 = 1.0), written atomically."""
    write_image(path, np.uint8(np.round(np.clip(x, 0, 1) * 255)))


def read_unit_map(path: str) -> np.ndarray:
    """Inverse of :func:`write_unit_map`."""
    m = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if m is None:
        raise OSError(f"cannot read map {path}")
    return m.astype(np.float32) / 255.0


def _write_label(path: str, lab: np.ndarray) -> None:
    write_image(path, lab.astype(np.uint8))


def update_index(folder: str, images: List[Dict]) -> str:
    """Rewrite ``folder/index.json`` from the stage files present for ``images`` (GT is never listed)."""
    old = {r["stem"]: r for r in read_index(folder)["images"]}
    recs = []
    for r in images:
        rec = dict(old.get(r["stem"], {}))
        rec.update(stem=r["stem"], file_name=os.path.abspath(r["file_name"]))
        if "height" not in rec:
            rec["height"], rec["width"] = read_he_image(r["file_name"]).shape[:2]
        for key, subs in (("pseudo_mask", ("refined", "pseudo")), ("voronoi", ("voronoi",))):
            rels = [os.path.join(sub, r["stem"] + ".png") for sub in subs]
            rec[key] = next((rel for rel in rels if os.path.isfile(os.path.join(folder, rel))), None)
        recs.append(rec)
    return write_index(folder, recs)


def _refuse_gt_folder(folder: str) -> None:
    if os.path.isfile(os.path.join(folder, GT_MARKER)):
        raise ValueError(f"{folder} holds ground-truth labels (supervised-labels, {GT_MARKER}); the label-free PSM "
                         "stages need a folder of their own")


def run_self_supervised(images: List[Dict], folder: str, cfg: CfgNode, log: Log = _print) -> SelfSupervisedNet:
    """Stage 1: train (or load ``folder/self_sup.pth``) the rot180-consistency network on the images."""
    _refuse_gt_folder(folder)
    s = cfg.PSM.SELF_SUP
    path = os.path.join(folder, "self_sup.pth")
    net = SelfSupervisedNet(tuple(s.CHANNELS))
    if os.path.isfile(path):
        net.load_state_dict(torch.load(path, map_location="cpu"))
        log(f"[psm stage 1] loaded {path}")
        return net.eval()
    os.makedirs(folder, exist_ok=True)
    pixels = [read_he_image(r["file_name"]) for r in images]
    start = time.perf_counter()
    net = train_self_supervised(pixels, s.ITERS, s.CROP, s.BATCH, s.LR, tuple(s.CHANNELS), seed=cfg.SEED % 2**31,
                                progress=lambda i, v: log(f"[psm stage 1] iter {i}/{s.ITERS} L1 {v:.4f}"))
    save_torch(path, net.state_dict())
    log(f"[psm stage 1] trained in {time.perf_counter() - start:.0f} s -> {path}")
    return net


def _each(images: List[Dict], out_dir: str, stage: str, log: Log):
    """Yield (i, record, output path) for images whose output is missing; log progress."""
    os.makedirs(out_dir, exist_ok=True)
    for i, r in enumerate(images):
        path = os.path.join(out_dir, r["stem"] + ".png")
        if os.path.isfile(path):
            log(f"[psm {stage}] {i + 1}/{len(images)} {r['stem']}: exists, skipped")
            continue
        start = time.perf_counter()
        yield i, r, path
        log(f"[psm {stage}] {i + 1}/{len(images)} {r['stem']} ({time.perf_counter() - start:.1f} s)")


def run_activation(images: List[Dict], folder: str, cfg: CfgNode, log: Log = _print) -> None:
    """Stages 1-2: self-activation maps ``activation/<stem>.png``."""
    _refuse_gt_folder(folder)
    out = os.path.join(folder, "activation")
    if all(os.path.isfile(os.path.join(out, r["stem"] + ".png")) for r in images):
        log("[psm stage 2] all activation maps exist")
        return
    net = run_self_supervised(images, folder, cfg, log)
    for _, r, path in _each(images, out, "stage 2", log):
        write_unit_map(path, self_activation_map(net, read_he_image(r["file_name"]), cfg.PSM.ACTIVATION_TILE))


def run_pseudo_masks(images: List[Dict], folder: str, cfg: CfgNode, log: Log = _print) -> None:
    """Stage 3: pseudo masks ``pseudo/<stem>.png`` from the images and their activation maps."""
    _refuse_gt_folder(folder)
    p = cfg.PSM.PSEUDO_MASK
    if p.METHOD not in ("kmeans", "haematoxylin"):
        raise ValueError(f"PSM.PSEUDO_MASK.METHOD must be 'kmeans' or 'haematoxylin', got {p.METHOD!r}")
    for _, r, path in _each(images, os.path.join(folder, "pseudo"), "stage 3", log):
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
        _write_label(path, mask)
    update_index(folder, images)


def run_voronoi(images: List[Dict], folder: str, cfg: CfgNode, log: Log = _print) -> None:
    """Stage 5: points and Voronoi labels from ``probability/<stem>.png`` (the detection network's output)."""
    _refuse_gt_folder(folder)
    pt = cfg.PSM.POINTS
    for _, r, path in _each(images, os.path.join(folder, "voronoi"), "stage 5", log):
        prob = read_unit_map(os.path.join(folder, "probability", r["stem"] + ".png"))
        points = detect_points(prob, pt.SIGMA, pt.MIN_DISTANCE, pt.THRESHOLD)
        write_json(os.path.join(folder, "points", r["stem"] + ".json"), points.tolist(), indent=None)
        _write_label(path, voronoi_labels(points, prob.shape, pt.RADIUS))
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


def run_refined_masks(images: List[Dict], folder: str, cfg: CfgNode, log: Log = _print) -> None:
    """Stage 5b with ``PSM.REFINE.ENABLED``: ``refined/<stem>.png`` from ``probability/<stem>.png``; the index then
    names them as the pseudo masks, so stage 6 trains on the detection network's confident pixels rather than on
    the stage-3 masks. Without the switch a folder holding refined masks is an error (stage 6 would train on
    them)."""
    _refuse_gt_folder(folder)
    r5 = cfg.PSM.REFINE
    out = os.path.join(folder, "refined")
    if not r5.ENABLED:
        if os.path.isdir(out) and os.listdir(out):
            raise ValueError(f"{out} holds refined pseudo masks (a PSM.REFINE.ENABLED run) that stage 6 would train "
                             "on: remove that folder or set PSM.REFINE.ENABLED True")
        return
    _check_band(r5.FG, r5.BG)  # a bad band fails before any file is written
    for _, r, path in _each(images, out, "stage 5b", log):
        prob = read_unit_map(os.path.join(folder, "probability", r["stem"] + ".png"))
        write_image(path, refined_mask(prob, r5.FG, r5.BG, int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)))
    update_index(folder, images)


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


def run_supervised_labels(images: List[Dict], folder: str, gt_source: str = "", log: Log = _print) -> None:
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
    for _, r, path in _each(images, os.path.join(folder, "voronoi"), "supervised labels", log):
        gt_path = r["instance_file_name"]
        inst = cv2.imread(gt_path, cv2.IMREAD_UNCHANGED)
        if inst is None:
            raise OSError(f"cannot read ground-truth instance map {gt_path}")
        shape = read_he_image(r["file_name"]).shape[:2]
        if inst.shape != shape:
            raise ValueError(f"ground-truth instance map {gt_path} has size {inst.shape}, its image "
                             f"{r['file_name']} {shape}")
        pseudo, voronoi = supervised_labels(inst)
        _write_label(os.path.join(folder, "pseudo", r["stem"] + ".png"), pseudo)
        _write_label(path, voronoi)  # last: its presence marks the image done (resume)
    update_index(folder, images)


def load_psm_cfg(config_file: str, opts: Optional[List[str]] = None) -> CfgNode:
    """The project config with ``config_file`` and ``KEY VALUE`` overrides merged (frozen)."""
    from mmt_psm.config import load_config

    cfg = load_config(config_file, opts)
    cfg.freeze()
    return cfg
