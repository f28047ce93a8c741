"""The files of a PSM label folder: image records, unit maps, label PNGs, the ``index.json`` and the ground-truth
marker, plus the per-image resume loop every stage uses. Layout: :mod:`mmt_psm.nuclei.pipeline.stages`."""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np

from mmt_psm.core.atomic import write_image
from mmt_psm.nuclei.tile_io import list_images, read_he_image, read_index, stem_of, write_index

__all__ = ["GT_MARKER", "Log", "print_progress", "resolve_images", "write_unit_map", "read_unit_map", "write_label",
           "update_index", "refuse_gt_folder", "each_missing"]

GT_MARKER = "ground_truth_labels.json"  # present in (only) a supervised-upper-bound label folder
Log = Callable[[str], None]


def print_progress(msg: str) -> None:
    """The default ``log`` of the stages: one flushed line per message."""
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


def write_label(path: str, lab: np.ndarray) -> None:
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


def refuse_gt_folder(folder: str) -> None:
    if os.path.isfile(os.path.join(folder, GT_MARKER)):
        raise ValueError(f"{folder} holds ground-truth labels (supervised-labels, {GT_MARKER}); the label-free PSM "
                         "stages need a folder of their own")


def each_missing(images: List[Dict], out_dir: str, stage: str, log: Log) -> Iterator[Tuple[int, Dict, str]]:
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
