"""Registration of the PSM nuclei data sets in Detectron2's catalogs.

- ``monuseg_train``: the converted MoNuSeg training images WITHOUT labels (PSM is label-free);
  ``monuseg_train_labels_for_eval``: the same with instance maps, only to score pseudo labels;
- ``monuseg_test``: the 14 test images with their instance maps (``evaluator_type "nuclei_instances"``);
- every PSM label folder (``index.json``, see :mod:`mmt_psm.nuclei.tile_io`) found as
  ``$DETECTRON2_DATASETS/psm/<name>/index.json`` -> ``psm_<name>``, and every ``name=folder`` entry of the
  environment variable ``MMT_PSM_LABEL_SETS`` (``os.pathsep``-separated) -> ``name``, so that
  ``tools/train_net.py`` sees the stage tools' output without Python.

Each dict: ``file_name``, ``height``, ``width``, ``image_id``, and where present ``sem_seg_file_name`` (the pseudo
mask, 0/1/255), ``voronoi_file_name`` (0 = background, 1 = nucleus, 255 = ignore) and ``instance_file_name``
(uint16 instance map, evaluation only).
"""
from __future__ import annotations

import glob
import os
from typing import Any, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from mmt_psm.nuclei.tile_io import read_index

__all__ = ["register_monuseg", "register_psm_labels", "register_all_psm", "load_psm_index", "monuseg_root"]

# the command a missing file's error names (datasets/README.md says where to get MoNuSeg)
PREPARE = "python datasets/prepare_monuseg.py --source PATH/TO/monuseg"
PSM_CLASSES = ["background", "nucleus"]


def monuseg_root() -> str:
    """``<DETECTRON2_DATASETS>/nuclei/monuseg`` (``DETECTRON2_DATASETS`` defaults to ``datasets``)."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "nuclei", "monuseg")


def _register(name: str, loader, **meta: Any) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(stuff_classes=list(PSM_CLASSES), ignore_label=255,
                                  evaluator_type="nuclei_instances", **meta)


def _load_monuseg(root: str, split: str, with_labels: bool) -> List[Dict[str, Any]]:
    img_dir = os.path.join(root, split, "images")
    files = sorted(glob.glob(os.path.join(img_dir, "*.png")))
    if not files:
        raise FileNotFoundError(f"no MoNuSeg {split} images in {img_dir}. Prepare them with: {PREPARE} "
                                f"--output {root} (datasets/README.md: where to get the data)")
    dicts = []
    for i, f in enumerate(files):
        d = {"file_name": f, "image_id": i}  # the mapper reads the size from the image
        if with_labels:
            lab = os.path.join(root, split, "labels", os.path.basename(f))
            if not os.path.isfile(lab):
                raise FileNotFoundError(f"MoNuSeg label {lab} missing. Prepare with: {PREPARE} --output {root}")
            d["instance_file_name"] = lab
        dicts.append(d)
    return dicts


def register_monuseg(root: Optional[str] = None) -> List[str]:
    """Register ``monuseg_train`` (no labels), ``monuseg_train_labels_for_eval`` and ``monuseg_test``."""
    root = root or monuseg_root()
    _register("monuseg_train", lambda: _load_monuseg(root, "train", False), unlabeled=True)
    _register("monuseg_train_labels_for_eval", lambda: _load_monuseg(root, "train", True))
    _register("monuseg_test", lambda: _load_monuseg(root, "test", True))
    return ["monuseg_train", "monuseg_train_labels_for_eval", "monuseg_test"]


def load_psm_index(folder: str) -> List[Dict[str, Any]]:
    """Detectron2 dicts of a PSM label folder's ``index.json`` (label paths made absolute, checked to exist)."""
    index = read_index(folder)
    if not index["images"]:
        raise FileNotFoundError(f"{folder}/index.json missing or empty: run the PSM stage tools "
                                "(tools/psm_pipeline.py) first")
    dicts = []
    for i, rec in enumerate(index["images"]):
        d = {"file_name": rec["file_name"], "height": rec["height"], "width": rec["width"], "image_id": i}
        for key, field in (("pseudo_mask", "sem_seg_file_name"), ("voronoi", "voronoi_file_name"),
                           ("instances", "instance_file_name")):
            if rec.get(key):
                path = rec[key] if os.path.isabs(rec[key]) else os.path.join(folder, rec[key])
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{folder}/index.json names {path}, which does not exist")
                d[field] = path
        dicts.append(d)
    return dicts


def register_psm_labels(name: str, folder: str) -> str:
    """Register the PSM label folder ``folder`` (with ``index.json``) as ``name``; returns ``name``."""
    folder = os.path.abspath(folder)
    _register(name, lambda: load_psm_index(folder), label_folder=folder)
    return name


def register_all_psm() -> List[str]:
    """MoNuSeg names, ``psm_<name>`` for ``$DETECTRON2_DATASETS/psm/*/index.json``, ``MMT_PSM_LABEL_SETS``."""
    names = register_monuseg()
    base = os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "psm")
    for index in sorted(glob.glob(os.path.join(base, "*", "index.json"))):
        folder = os.path.dirname(index)
        names.append(register_psm_labels("psm_" + os.path.basename(folder), folder))
    for entry in filter(None, os.environ.get("MMT_PSM_LABEL_SETS", "").split(os.pathsep)):
        name, sep, folder = entry.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"MMT_PSM_LABEL_SETS entry {entry!r}: expected name=folder")
        names.append(register_psm_labels(name, folder))
    return names
