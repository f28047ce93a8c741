"""Inputs of ``tools/benchmark.py``: noise images with elliptic cells, real images through the training mappers,
and trained weights loaded into a plain or a teacher-student detector."""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, List

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.structures import BitMasks, Instances

from mmt_psm.instance.view_mapper import MMTPSMViewMapper
from mmt_psm.instance.views import make_unlabeled_views

__all__ = ["labeled_dict", "unlabeled_dict", "dataset_dicts", "data_loading_times", "load_weights"]


def _image_and_masks(rng: np.random.Generator, size: int, n: int) -> tuple:
    """A gray (channel-replicated) uint8 noise image with ``n`` darker elliptic cells and their bool masks."""
    gray = rng.integers(150, 256, (size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    masks = []
    for _ in range(n):
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        ry, rx = rng.uniform(0.03, 0.15, 2) * size
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        gray[m] //= 2
        masks.append(m)
    return np.repeat(gray[:, :, None], 3, axis=2), np.stack(masks) if masks else np.zeros((0, size, size), bool)


def labeled_dict(rng: np.random.Generator, size: int, n: int, num_classes: int) -> Dict[str, Any]:
    """A dataset dict like the training mapper's: CHW uint8 image + Instances (boxes, classes, bitmasks)."""
    img, masks = _image_and_masks(rng, size, n)
    bitmasks = BitMasks(torch.from_numpy(masks))
    classes = torch.from_numpy(rng.integers(0, num_classes, len(masks))).long()
    inst = Instances((size, size), gt_boxes=bitmasks.get_bounding_boxes(), gt_classes=classes, gt_masks=bitmasks)
    image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return {"image": image, "instances": inst, "height": size, "width": size, "labeled": True}


def unlabeled_dict(rng: np.random.Generator, size: int, view_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """An unlabeled dict like MMTPSMViewMapper's: teacher/student views of one image."""
    views = make_unlabeled_views(_image_and_masks(rng, size, 8)[0], rng, **view_kwargs)
    return {**views, "height": size, "width": size, "labeled": False}


def dataset_dicts(cfg: CfgNode, args: argparse.Namespace) -> tuple:
    """(L+U labeled dicts, U unlabeled view dicts) from the registered labeled data set ``--dataset`` through the
    training mappers (numpy seeded by ``--seed``; images reused cyclically when the set is small)."""
    from detectron2.data import DatasetCatalog

    from mmt_psm.instance.mapper import CellDatasetMapper

    dicts = DatasetCatalog.get(args.dataset)
    if not dicts:
        raise ValueError(f"--dataset {args.dataset} has no images")
    np.random.seed(args.seed)
    mapper, views = CellDatasetMapper(cfg, True), MMTPSMViewMapper(cfg)
    lab = [mapper(dicts[i % len(dicts)]) for i in range(args.labeled + args.unlabeled)]
    for d in lab:
        d["labeled"] = True
    unl = []
    for i in range(args.unlabeled):
        d = {k: v for k, v in dicts[(args.labeled + i) % len(dicts)].items() if k != "annotations"}
        unl.append({**views(d), "labeled": False})
    return lab, unl


def data_loading_times(cfg: CfgNode, args: argparse.Namespace, steps: int) -> List[float]:
    """Seconds, per step, to read and map one MMT-PSM step's images from ``--dataset`` in this process: ``--labeled``
    through ``CellDatasetMapper`` and ``--unlabeled`` through ``MMTPSMViewMapper`` (what the training loader's
    workers do per step; numpy seeded by ``--seed``; images taken cyclically)."""
    from detectron2.data import DatasetCatalog

    from mmt_psm.instance.mapper import CellDatasetMapper

    dicts = DatasetCatalog.get(args.dataset)
    np.random.seed(args.seed)
    mapper, views = CellDatasetMapper(cfg, True), MMTPSMViewMapper(cfg)
    n, times = args.labeled + args.unlabeled, []
    for s in range(steps):
        start = time.perf_counter()
        for i in range(args.labeled):
            mapper(dicts[(s * n + i) % len(dicts)])
        for i in range(args.labeled, n):
            views({k: v for k, v in dicts[(s * n + i) % len(dicts)].items() if k != "annotations"})
        times.append(time.perf_counter() - start)
    return times


def load_weights(model: torch.nn.Module, path: str) -> None:
    """A trained checkpoint into ``model``: an MMT-PSM checkpoint's student into a plain detector, a plain
    detector's weights into MMT-PSM's student and teacher (``TeacherStudentMixin``), like for like as is."""
    from detectron2.checkpoint import DetectionCheckpointer

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    if not hasattr(model, "teacher_student_pairs") and any(k.startswith("student.") for k in state):
        missing = model.load_state_dict({k[len("student."):]: v for k, v in state.items()
                                         if k.startswith("student.")}, strict=False).missing_keys
        if missing:
            raise ValueError(f"{path}: the student's weights miss {missing[:5]} of this detector")
        return
    DetectionCheckpointer(model).load(path)
