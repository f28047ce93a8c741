"""Inference and outputs of the PSM networks on a folder or data set (``tools/psm_stage.py``, ``psm_pipeline.py``).

:func:`predict_probabilities` runs a trained ``PSMNucleiSegmentor`` (or plain ``SemanticSegmentor``) image by
image and writes ``<stem>.png`` foreground probabilities (uint8). :func:`write_instances` turns them into
uint16 instance maps, a COCO results JSON (RLE, score = mean probability), overlay PNGs (instance contours on
the image) and, for images with ground truth, ``metrics.json`` (full-image MoNuSeg metrics + the paper's crop
protocol). :func:`score_labels` logs pseudo-mask / Voronoi quality against GT the pipeline never trained on.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Tuple

import cv2
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from pycocotools import mask as mask_util

from mmt_psm.core.atomic import write_image, write_json
from mmt_psm.nuclei.deps import skimage
from mmt_psm.nuclei.evaluator import foreground_probability, instance_scores_of
from mmt_psm.nuclei.instances import instances_from_probability
from mmt_psm.nuclei.label_quality import mask_counts, pooled_quality, voronoi_counts
from mmt_psm.nuclei.metrics import coco_mask_ap, image_scores, paper_protocol_scores, summarize_scores
from mmt_psm.nuclei.pipeline.label_files import Log, print_progress, read_unit_map, write_unit_map
from mmt_psm.nuclei.tile_io import read_he_image
from mmt_psm.nuclei.tta import dihedral_probability

__all__ = ["predict_probabilities", "probability_source", "write_instances", "score_labels", "contour_overlay"]


PROBABILITY_SOURCE = "source.json"


def probability_source(cfg: CfgNode, weights: str) -> Dict:
    """What a folder of probability maps was computed with: the weights file (path, size, modification time) and
    ``PSM.TEST.TTA``. Resuming keeps a folder's maps only when this matches."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights {weights!r} do not exist (a trained model_final.pth is needed)")
    st = os.stat(weights)
    return {"weights": os.path.abspath(weights), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "tta": bool(cfg.PSM.TEST.TTA)}


def _reuse_or_clear(out_dir: str, source: Dict, images: List[Dict], log: Log) -> None:
    """Make ``out_dir`` hold only maps of ``source``: maps written by other weights or another TTA setting are
    removed (then ``source.json`` is written, so an interrupted clean-up resumes); maps without a
    ``source.json`` (unknown origin) are an error rather than silently reused."""
    path = os.path.join(out_dir, PROBABILITY_SOURCE)
    present = [m for m in (os.path.join(out_dir, r["stem"] + ".png") for r in images) if os.path.isfile(m)]
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old != source:
            log(f"[psm predict] {out_dir} holds maps of {old}; predicting every image again with {source}")
            for m in present:
                os.remove(m)
    elif present:
        raise FileExistsError(f"{out_dir} holds {len(present)} probability maps but no {PROBABILITY_SOURCE} saying "
                              "which weights and PSM.TEST.TTA setting wrote them: remove them or choose another "
                              "output folder")
    write_json(path, source)


@torch.no_grad()
def predict_probabilities(cfg: CfgNode, weights: str, images: List[Dict], out_dir: str, log: Log = print_progress,
) -> None:
    """Foreground probability ``out_dir/<stem>.png`` of every image; with ``PSM.TEST.TTA`` the mean over the 8
    rot90/flip views. Resumable: maps of the same weights and TTA setting (``source.json``) are kept, others
    redone."""
    from detectron2.modeling import build_model

    from mmt_psm.nuclei.mapper import PSMNucleiMapper

    source = probability_source(cfg, weights)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()
    mapper = PSMNucleiMapper(cfg, is_train=False)
    os.makedirs(out_dir, exist_ok=True)
    _reuse_or_clear(out_dir, source, images, log)
    for i, r in enumerate(images):
        path = os.path.join(out_dir, r["stem"] + ".png")
        if os.path.isfile(path):
            continue
        start = time.perf_counter()
        d = mapper({"file_name": r["file_name"]})
        prob = dihedral_probability(model, d) if cfg.PSM.TEST.TTA else foreground_probability(model([d])[0]["sem_seg"])
        write_unit_map(path, prob)
        log(f"[psm predict] {i + 1}/{len(images)} {r['stem']} ({time.perf_counter() - start:.1f} s)")


def contour_overlay(image: np.ndarray, inst: np.ndarray, bgr: Tuple[int, int, int] = (0, 255, 255)) -> np.ndarray:
    """BGR copy of an RGB image with the instance map's inner boundaries painted ``bgr`` (default yellow)."""
    out = np.ascontiguousarray(image[:, :, ::-1]).copy()
    out[skimage("segmentation").find_boundaries(inst, mode="inner")] = bgr
    return out


def write_instances(cfg: CfgNode, images: List[Dict], prob_dir: str, out_dir: str, log: Log = print_progress,
) -> Dict:
    """Instance maps, COCO results, overlays (and metrics when GT exists) under ``out_dir``; returns metrics."""
    ins, pts = cfg.PSM.INSTANCES, cfg.PSM.POINTS
    results, scores, paper, maps = [], [], [], []
    for image_id, r in enumerate(images):
        prob = read_unit_map(os.path.join(prob_dir, r["stem"] + ".png"))
        inst = instances_from_probability(prob, ins.THRESHOLD, ins.MIN_SIZE, watershed=ins.WATERSHED,
                                          sigma=pts.SIGMA, min_distance=pts.MIN_DISTANCE, surface=ins.SURFACE)
        write_image(os.path.join(out_dir, "instances", r["stem"] + ".png"), inst.astype(np.uint16))
        overlay = contour_overlay(read_he_image(r["file_name"]), inst)
        write_image(os.path.join(out_dir, "overlays", r["stem"] + ".png"), overlay)
        sc = instance_scores_of(inst, prob)
        for v, s in enumerate(sc, start=1):
            rle = mask_util.encode(np.asfortranarray((inst == v).astype(np.uint8)))
            results.append({"image_id": image_id, "file_name": r["file_name"], "category_id": 1, "score": s,
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
        if "instance_file_name" in r:
            gt = cv2.imread(r["instance_file_name"], cv2.IMREAD_UNCHANGED)
            scores.append({"stem": r["stem"], **image_scores(gt, inst)})
            paper.append(paper_protocol_scores(gt, inst, cfg.PSM.PAPER_CROP))
            maps.append((gt, inst, sc))
        log(f"[psm instances] {image_id + 1}/{len(images)} {r['stem']}: {int(inst.max())} nuclei")
    write_json(os.path.join(out_dir, "predictions_coco.json"), results, indent=None)
    metrics: Dict = {}
    if scores:
        metrics = {"full_image": {**summarize_scores(scores), **coco_mask_ap(*zip(*maps))},
                   "paper_protocol": summarize_scores(paper), "per_image": scores}
        write_json(os.path.join(out_dir, "metrics.json"), metrics)
        log("[psm metrics] " + json.dumps({k: round(v, 4) for k, v in metrics["full_image"].items()}))
        paper_summary = {k: round(v, 4) for k, v in metrics["paper_protocol"].items()}
        log("[psm metrics paper protocol] " + json.dumps(paper_summary))
    return metrics


def score_labels(images: List[Dict], folder: str, log: Log = print_progress,
) -> Dict:
    """Pooled quality of ``folder``'s pseudo masks / Voronoi labels / points against images' GT (when any)."""
    pseudo, vor, refined = [], [], []
    for r in images:
        if "instance_file_name" not in r:
            continue
        gt = cv2.imread(r["instance_file_name"], cv2.IMREAD_UNCHANGED)
        p = os.path.join(folder, "pseudo", r["stem"] + ".png")
        if os.path.isfile(p):
            pseudo.append(mask_counts(cv2.imread(p, cv2.IMREAD_UNCHANGED) == 1, gt))  # 255 (ignore) is not nucleus
        p = os.path.join(folder, "refined", r["stem"] + ".png")
        if os.path.isfile(p):  # 0/1/255 like the Voronoi labels: nucleus / background precision, labelled share
            refined.append(voronoi_counts(cv2.imread(p, cv2.IMREAD_UNCHANGED), gt))
        v, pt = os.path.join(folder, "voronoi", r["stem"] + ".png"), os.path.join(folder, "points", r["stem"] + ".json")
        if os.path.isfile(v):
            points = np.asarray(json.load(open(pt))) if os.path.isfile(pt) else None
            vor.append(voronoi_counts(cv2.imread(v, cv2.IMREAD_UNCHANGED), gt, points))
    out = {k: pooled_quality(c) for k, c in (("pseudo_mask", pseudo), ("voronoi", vor), ("refined_mask", refined))
           if c}
    if out:
        write_json(os.path.join(folder, "label_quality.json"), out)
        log("[psm label quality] " + json.dumps({k: {a: round(b, 4) for a, b in v.items()} for k, v in out.items()}))
    return out
