"""Seeded labeled/unlabeled split files and the derived data sets they register.

A split file is JSON::

    {"dataset": "isbi2015_train", "seed": 1, "count": 2, "percent": null,
     "labeled_ids": [...], "unlabeled_ids": [...]}

It lists image IDS (the COCO ``image_id``), never list positions, so it stays valid when a data set's files
are re-ordered. The labeled ids are ``random.Random(seed).sample(sorted_ids, k)``, which is the same on every
machine and Python 3 version; both id lists are stored sorted. Written by ``tools/make_splits.py``.
"""
from __future__ import annotations

import json
import math
import os
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mmt_psm.core.atomic import write_json

SPLIT_KEYS = ("dataset", "seed", "count", "percent", "labeled_ids", "unlabeled_ids")


def num_labeled(n: int, count: Optional[int] = None, percent: Optional[float] = None) -> int:
    """Number of labeled images: ``count``, or ``percent`` of ``n`` rounded half up (at least 1)."""
    if (count is None) == (percent is None):
        raise ValueError("give exactly one of count or percent")
    if count is not None:
        k = int(count)
    else:
        if not 0 < float(percent) <= 100:
            raise ValueError(f"percent must be in (0, 100], got {percent}")
        k = max(1, math.floor(n * float(percent) / 100.0 + 0.5))
    if not 0 < k <= n:
        raise ValueError(f"cannot label {k} of {n} images")
    return k


def make_split(
    dataset: str,
    image_ids: Sequence[int],
    seed: int,
    count: Optional[int] = None,
    percent: Optional[float] = None,
) -> Dict[str, Any]:
    """A split record choosing labeled ids with ``random.Random(seed)`` over the sorted ids."""
    ids = sorted({int(i) for i in image_ids})
    if len(ids) != len(image_ids):
        raise ValueError(f"{dataset}: duplicate image ids")
    k = num_labeled(len(ids), count, percent)
    labeled = sorted(random.Random(int(seed)).sample(ids, k))
    chosen = set(labeled)
    return {
        "dataset": dataset,
        "seed": int(seed),
        "count": int(count) if count is not None else None,
        "percent": float(percent) if percent is not None else None,
        "labeled_ids": labeled,
        "unlabeled_ids": [i for i in ids if i not in chosen],
    }


def write_split(path: str, split: Dict[str, Any]) -> None:
    """Write a split record as indented JSON (small, diff-friendly, committed to the repo), atomically."""
    write_json(path, {k: split[k] for k in SPLIT_KEYS})


def load_split(path: str) -> Dict[str, Any]:
    """Read and validate a split file (all keys present, disjoint sorted id lists)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file not found: {path} (write one with tools/make_splits.py)")
    with open(path) as f:
        try:
            split = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"split file {path} is not valid JSON: {e}") from None
    if not isinstance(split, dict):
        raise ValueError(f"split file {path} must hold a JSON object with keys {list(SPLIT_KEYS)}")
    missing = [k for k in SPLIT_KEYS if k not in split]
    if missing:
        raise ValueError(f"split file {path} lacks keys {missing}")
    lab, unl = split["labeled_ids"], split["unlabeled_ids"]
    for key, ids in (("labeled_ids", lab), ("unlabeled_ids", unl)):
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"split file {path}: {key} must be a list of integer image ids, got {ids!r:.80}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"split file {path}: {key} lists an id twice")
    if not lab:
        raise ValueError(f"split file {path}: labeled_ids is empty")
    if set(lab) & set(unl):
        raise ValueError(f"split file {path}: ids both labeled and unlabeled: {sorted(set(lab) & set(unl))}")
    split["labeled_ids"], split["unlabeled_ids"] = sorted(int(i) for i in lab), sorted(int(i) for i in unl)
    return split


def split_names(split: Dict[str, Any]) -> Tuple[str, str]:
    """Names of the derived data sets, e.g. ``isbi2015_train@seed1_n2_labeled`` / ``..._unlabeled``."""
    size = f"n{split['count']}" if split.get("count") is not None else f"p{split['percent']:g}"
    stem = f"{split['dataset']}@seed{split['seed']}_{size}"
    return f"{stem}_labeled", f"{stem}_unlabeled"


# Base metadata a derived subset must not inherit: its json_file lists the WHOLE base, so COCOEvaluator would
# count the images outside the subset as missed (without it, the evaluator converts the subset's own dicts).
_NOT_INHERITED = ("name", "json_file", "split_file", "base_dataset")


def _inherit_metadata(base: str, name: str) -> None:
    """Copy the base's metadata keys that ``name`` lacks (some loaders set e.g. thing_classes only on load)."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    for k, v in MetadataCatalog.get(base).as_dict().items():
        if k not in _NOT_INHERITED and not hasattr(meta, k):
            setattr(meta, k, v)


def _select(base: str, ids: List[int], split_file: str, strip: bool, name: str = "") -> List[Dict[str, Any]]:
    from detectron2.data import DatasetCatalog

    by_id = {d["image_id"]: d for d in DatasetCatalog.get(base)}
    if name:
        _inherit_metadata(base, name)
    absent = [i for i in ids if i not in by_id]
    if absent:
        raise ValueError(f"split file {split_file}: image ids {absent} are not in data set {base}")
    out = [dict(by_id[i]) for i in ids]
    if strip:
        for d in out:
            d.pop("annotations", None)
    return out


def check_split_base(split_file: str, train_names: Sequence[str]) -> None:
    """ValueError unless the split file's base data set is the one in ``DATASETS.TRAIN`` (the split replaces
    DATASETS.TRAIN, so another name there would be silently ignored)."""
    base = load_split(split_file)["dataset"]
    if list(train_names) != [base]:
        raise ValueError(
            f"DATASETS.SPLIT_FILE {split_file} splits data set {base!r}, but DATASETS.TRAIN is "
            f"{tuple(train_names)}: set DATASETS.TRAIN ('{base}',) or DATASETS.SPLIT_FILE '\"\"'"
        )


def register_split(split_file: str) -> Tuple[str, str]:
    """Register the labeled and unlabeled (annotations stripped) subsets of a split file's base data set.

    The base data set must already be registered; registration reads only the small split file. Returns
    ``(labeled_name, unlabeled_name)``; registering the same file again replaces the two entries.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    split = load_split(split_file)
    base = split["dataset"]
    if base not in DatasetCatalog.list():
        raise KeyError(f"split file {split_file}: base data set {base!r} is not registered")
    names = split_names(split)
    for name, ids, strip in zip(names, (split["labeled_ids"], split["unlabeled_ids"]), (False, True)):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name, lambda ids=ids, strip=strip, name=name: _select(base, ids, split_file, strip, name)
        )
        MetadataCatalog.get(name).set(split_file=split_file, base_dataset=base)
        _inherit_metadata(base, name)  # class names, evaluator type, ... (the rest when the base is loaded)
    return names
