"""Your own data without Python: COCO instance files and folders of unlabeled images registered by name.

``DATASETS.REGISTER`` (or :func:`register_user_dataset`) takes entries of the form

    "name:path/instances.json:path/image_root"   COCO instance JSON; ``file_name`` relative to image_root
    "name:path/instances.json"                   the same, image_root = the JSON's folder
    "name:path/folder"                           every image file in the folder (not recursive), unlabeled
    "name:path/*.png" (any glob, ``**`` works)   the matching image files, unlabeled

COCO files may have any number of classes and any category ids (mapped to contiguous ids in category-id
order, as Detectron2's ``load_coco_json`` does), polygon or RLE masks, and gray, RGB or 16-bit images of any
size. A JSON without categories (and annotations) is an unlabeled data set. The metadata (``thing_classes``,
``thing_dataset_id_to_contiguous_id``, ``evaluator_type "coco"``, ``json_file``) is set at registration, so
split files and class-count checks see it before anything is loaded.

Every image is decoded once per process when a data set is first loaded (threads; results cached by path,
size and mtime). A file that cannot be read, or whose size differs from its JSON record, is handled by
``bad_images``: ``"error"`` raises one ``ValueError`` listing every bad file before training starts;
``"skip"`` drops them with one warning that counts them.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from mmt_psm.core.image_io import IMAGE_EXTENSIONS, list_image_files
from mmt_psm.core.registry import CONFIG_DATASETS, DATASET_CHECKS
from mmt_psm.instance.mapper import read_image_checked

__all__ = [
    "IMAGE_EXTENSIONS",
    "parse_register_entry",
    "register_user_coco",
    "register_image_folder",
    "register_user_dataset",
    "register_datasets_from_config",
    "check_images",
    "check_num_classes",
]

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
_SIZE_CACHE: Dict[Tuple[str, float, int], Any] = {}  # (path, mtime, bytes) -> (h, w) or an error message


def parse_register_entry(entry: str) -> Tuple[str, str, Optional[str]]:
    """``"name:a[:b]"`` -> ``(name, a, b or None)``; paths may not contain ':'."""
    parts = [p.strip() for p in str(entry).split(":")]
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(
            f"DATASETS.REGISTER entry {entry!r}: expected 'name:instances.json:image_root', "
            "'name:instances.json' or 'name:folder-or-glob' (no ':' inside paths)"
        )
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _image_size(path: str) -> Any:
    """(h, w) of a decodable image, else the error message (cached per path/mtime/size)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    key = (path, st.st_mtime, st.st_size)
    if key not in _SIZE_CACHE:
        try:
            _SIZE_CACHE[key] = tuple(read_image_checked(path).shape[:2])
        except (OSError, ValueError) as e:
            _SIZE_CACHE[key] = str(e)
    return _SIZE_CACHE[key]


def check_images(
    dicts: List[Dict[str, Any]], name: str, bad_images: str = "error", num_threads: int = 4
) -> List[Dict[str, Any]]:
    """Decode every ``file_name`` once; fill in missing ``height``/``width``; apply the bad-image policy.

    A record is bad when its image cannot be decoded or its size differs from its ``height``/``width``.
    """
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"DATASETS.BAD_IMAGES must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
    with ThreadPoolExecutor(max(1, num_threads)) as pool:  # OpenCV decodes outside the GIL
        sizes = list(pool.map(_image_size, [d["file_name"] for d in dicts]))
    good, bad = [], []
    for d, size in zip(dicts, sizes):
        if isinstance(size, str):
            bad.append(f"{d['file_name']}: {size}")
            continue
        expected = (d.get("height", size[0]), d.get("width", size[1]))
        if tuple(expected) != tuple(size):
            bad.append(f"{d['file_name']}: image is {size[0]}x{size[1]} (HxW) but its record says "
                       f"{expected[0]}x{expected[1]}")
            continue
        d["height"], d["width"] = int(size[0]), int(size[1])
        good.append(d)
    if bad:
        listing = "\n  ".join(bad)
        if bad_images == "error":
            raise ValueError(
                f"data set {name!r}: {len(bad)} of {len(dicts)} images are unreadable or mis-sized "
                f"(set DATASETS.BAD_IMAGES skip to drop them):\n  {listing}"
            )
        logger.warning(f"data set {name!r}: skipped {len(bad)} of {len(dicts)} unreadable or mis-sized "
                       f"images (DATASETS.BAD_IMAGES skip):\n  {listing}")
    return good


def _categories(json_file: str) -> List[Dict[str, Any]]:
    with open(json_file) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{json_file} is not a COCO instance file (no 'images' list)")
    return sorted(data.get("categories") or [], key=lambda c: c["id"])


def _reset(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _load_user_coco(json_file: str, image_root: str, name: str, labeled: bool, bad_images: str) -> List[Dict]:
    if labeled:
        dicts = load_coco_json(json_file, image_root, name)
    else:  # no categories: images only (Detectron2's loader needs at least one category)
        with open(json_file) as f:
            images = json.load(f)["images"]
        dicts = [{"file_name": os.path.join(image_root, im["file_name"]), "image_id": im["id"],
                  **{k: im[k] for k in ("height", "width") if k in im}} for im in images]
    return check_images(dicts, name, bad_images)


def register_user_coco(name: str, json_file: str, image_root: Optional[str] = None,
                       bad_images: str = "error") -> None:
    """Register a COCO instance file under ``name`` (see the module docstring); reads its categories now."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"data set {name!r}: COCO file not found: {json_file}")
    image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(json_file))
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"data set {name!r}: image root not found: {image_root}")
    cats = _categories(json_file)
    _reset(name)
    labeled = bool(cats)
    DatasetCatalog.register(name, lambda: _load_user_coco(json_file, image_root, name, labeled, bad_images))
    meta = {"json_file": json_file, "image_root": image_root, "user_registered": True}
    if labeled:
        meta.update(thing_classes=[str(c["name"]) for c in cats],
                    thing_dataset_id_to_contiguous_id={int(c["id"]): i for i, c in enumerate(cats)},
                    evaluator_type="coco")
    else:
        meta["unlabeled"] = True
    MetadataCatalog.get(name).set(**meta)


def _load_folder(source: str, name: str, bad_images: str) -> List[Dict[str, Any]]:
    files = list_image_files(source)
    if not files:
        raise FileNotFoundError(f"data set {name!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {source}")
    return check_images([{"file_name": f, "image_id": i} for i, f in enumerate(files)], name, bad_images)


def register_image_folder(name: str, source: str, bad_images: str = "error") -> None:
    """Register the images of a folder or glob as an unlabeled data set (image ids = sorted position)."""
    if not os.path.isdir(source) and not glob.has_magic(source):
        raise FileNotFoundError(f"data set {name!r}: {source} is neither a folder nor a glob pattern")
    _reset(name)
    DatasetCatalog.register(name, lambda: _load_folder(source, name, bad_images))
    MetadataCatalog.get(name).set(image_root=source, user_registered=True, unlabeled=True)


def register_user_dataset(entry: str, bad_images: str = "error") -> str:
    """Register one ``DATASETS.REGISTER`` entry; returns its name."""
    name, path, root = parse_register_entry(entry)
    if root is not None or path.lower().endswith(".json"):
        register_user_coco(name, path, root, bad_images)
    else:
        register_image_folder(name, path, bad_images)
    return name


@CONFIG_DATASETS.register("DATASETS.REGISTER")
def register_datasets_from_config(cfg: CfgNode) -> List[str]:
    """Register every ``cfg.DATASETS.REGISTER`` entry (idempotent) and check ``NUM_CLASSES`` against the
    training/test sets whose classes are known; returns the registered names."""
    names = [register_user_dataset(e, cfg.DATASETS.BAD_IMAGES) for e in cfg.DATASETS.REGISTER]
    check_num_classes(cfg, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    return names


@DATASET_CHECKS.register("MODEL.ROI_HEADS.NUM_CLASSES")
def check_num_classes(cfg: CfgNode, names: Sequence[str]) -> None:
    """ValueError when ``MODEL.ROI_HEADS.NUM_CLASSES`` differs from a data set's number of classes.

    Data sets whose metadata has no (or empty) ``thing_classes`` are not checked (unlabeled, semantic,
    not loaded yet)."""
    expected = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    for name in names:
        if name not in DatasetCatalog.list():
            continue
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes and len(classes) != expected:
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {expected} but data set {name!r} has {len(classes)} classes "
                f"{list(classes)}: set MODEL.ROI_HEADS.NUM_CLASSES {len(classes)}"
            )
