"""``PSMNucleiMapper``: an H&E tile + its PSM label maps -> ``PSMNucleiSegmentor`` / ``SemanticSegmentor`` input.

Training: a random ``INPUT.PSM_CROP_SIZE`` square crop (images smaller than it are padded with the ignore
value in the labels), then a random rot90 (k in 0..3) and horizontal flip, applied identically to the image, the
pseudo mask (``sem_seg``) and the Voronoi map (``voronoi``). Test: the whole image, no labels needed.
Images: see :func:`mmt_psm.nuclei.tile_io.read_he_image` (RGBA, gray and 16-bit handled; errors name the file).
"""
from __future__ import annotations

import copy
import random
from typing import Any, Dict, List, Optional

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode

from mmt_psm.core.registry import DATASET_MAPPERS
from mmt_psm.nuclei.tile_io import read_he_image

__all__ = ["PSMNucleiMapper", "read_psm_label"]


def read_psm_label(path: str, shape, ignore_value: int = 255) -> np.ndarray:
    """HxW int64 label map with values in {0, 1, ``ignore_value``}, checked against the image ``shape``."""
    lab = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise OSError(f"cannot read PSM label map {path}")
    if lab.ndim != 2 or lab.shape != tuple(shape[:2]):
        raise ValueError(f"{path}: label map {lab.shape} does not match its image {tuple(shape[:2])}")
    bad = np.setdiff1d(np.unique(lab), [0, 1, ignore_value])
    if bad.size:
        raise ValueError(f"{path}: label values {bad[:10].tolist()} (expected 0, 1 or {ignore_value})")
    return lab.astype(np.int64)


class PSMNucleiMapper:
    """Dataset dict -> ``{"image": 3xHxW float RGB, "sem_seg", "voronoi" (when files exist), height, width}``."""

    def __init__(self, cfg: CfgNode, is_train: bool = True):
        self.is_train = is_train
        self.crop = int(cfg.INPUT.PSM_CROP_SIZE)
        self.ignore = int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
        if len(cfg.MODEL.PIXEL_MEAN) != 3:
            raise ValueError("the psm_nuclei mapper reads RGB H&E images: MODEL.PIXEL_MEAN needs 3 values")

    def _crop(self, arrays: List[np.ndarray], fills: List[float]) -> List[np.ndarray]:
        h, w = arrays[0].shape[:2]
        c = self.crop
        y, x = random.randint(0, max(h - c, 0)), random.randint(0, max(w - c, 0))
        out = []
        for a, fill in zip(arrays, fills):
            part = a[y: y + c, x: x + c]
            if part.shape[0] < c or part.shape[1] < c:
                pad = np.full((c, c) + a.shape[2:], fill, a.dtype)
                pad[: part.shape[0], : part.shape[1]] = part
                part = pad
            out.append(part)
        return out

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        d = copy.deepcopy(dataset_dict)
        image = read_he_image(d["file_name"])
        d.setdefault("height", image.shape[0])
        d.setdefault("width", image.shape[1])
        labels: Dict[str, Optional[np.ndarray]] = {}
        if self.is_train:
            for key, field in (("sem_seg", "sem_seg_file_name"), ("voronoi", "voronoi_file_name")):
                if field in d:
                    labels[key] = read_psm_label(d[field], image.shape, self.ignore)
            names = list(labels)
            arrays = [image] + [labels[k] for k in names]
            if self.crop > 0:
                arrays = self._crop(arrays, [0] + [self.ignore] * len(names))
            k, flip = random.randint(0, 3), random.random() < 0.5
            arrays = [np.rot90(a, k) for a in arrays]
            if flip:
                arrays = [a[:, ::-1] for a in arrays]
            image = arrays[0]
            labels = dict(zip(names, arrays[1:]))
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32))
        for key, lab in labels.items():
            d[key] = torch.as_tensor(np.ascontiguousarray(lab), dtype=torch.long)
        return d


@DATASET_MAPPERS.register("psm_nuclei")
def build_psm_nuclei_mapper(cfg: CfgNode, is_train: bool) -> PSMNucleiMapper:
    """``INPUT.DATASET_MAPPER_NAME psm_nuclei``: an H&E tile + its PSM pseudo mask / Voronoi labels."""
    return PSMNucleiMapper(cfg, is_train)
