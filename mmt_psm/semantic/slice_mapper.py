"""``SemanticSliceMapper``: image + label-map files -> Detectron2 ``SemanticSegmentor`` inputs, with the
SSL4MIS/WSL4MIS slice augmentation.

Training (per slice, as SSL4MIS's ``RandomGenerator``): with p=0.5 a random rot90 (k in 0..3) and flip, else with
p=0.5 a random rotation in +-``INPUT.ROTATION_ANGLE`` degrees; then a resize to ``INPUT.FIXED_SIZE``. Test: only
the resize; ``height``/``width`` keep the original size so ``SemanticSegmentor`` resizes predictions back and the
evaluators score them at the original resolution. Label maps are warped with nearest neighbour, and pixels that
a rotation brings in from outside the image become ``IGNORE_VALUE`` (never silently "background").

Images: 8- or 16-bit PNG/TIFF, scaled to [0, 255] floats; 1 channel, or 3 when ``MODEL.PIXEL_MEAN`` has 3
entries (grey images are repeated). Unreadable files, channel mismatches and label values outside the classes
raise errors naming the file.
"""
from __future__ import annotations

import copy
import random
from typing import Any, Dict, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode

from mmt_psm.core.image_io import read_image_file
from mmt_psm.core.registry import DATASET_MAPPERS, register_unlabeled_mapper


def read_scaled_image(path: str, channels: int) -> np.ndarray:
    """HxWxC float32 in [0, 255] from an 8/16-bit file; grey -> ``channels`` copies; alpha dropped."""
    img = read_image_file(path)
    if img.dtype == np.uint16:
        img = img.astype(np.float32) * (255.0 / 65535.0)
    elif img.dtype == np.uint8:
        img = img.astype(np.float32)
    else:
        raise ValueError(f"{path}: unsupported image dtype {img.dtype} (expected 8- or 16-bit)")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 4:
        img = img[:, :, :3]
    if img.shape[2] == 3:
        img = img[:, :, ::-1]  # BGR -> RGB
    if img.shape[2] == channels:
        return np.ascontiguousarray(img)
    if img.shape[2] == 1:
        return np.repeat(img, channels, axis=2)
    raise ValueError(f"{path}: image has {img.shape[2]} channels but MODEL.PIXEL_MEAN has {channels}")


def read_label_map(path: str, num_classes: int, ignore_value: int) -> np.ndarray:
    """HxW int64 label map; values must be class ids or ``ignore_value``."""
    lab = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise OSError(f"cannot read label map {path} (missing or corrupt)")
    if lab.ndim != 2:
        raise ValueError(f"{path}: label map must be single-channel, got shape {lab.shape}")
    lab = lab.astype(np.int64)
    values = np.unique(lab)
    bad = values[(values >= num_classes) & (values != ignore_value) | (values < 0)]
    if bad.size:
        raise ValueError(f"{path}: label values {bad[:10].tolist()} outside 0..{num_classes - 1} "
                         f"(ignore value {ignore_value})")
    return lab


def _warp_label(lab: np.ndarray, matrix: np.ndarray, size: Tuple[int, int], ignore_value: int) -> np.ndarray:
    """Nearest-neighbour warp; pixels from outside the image become ``ignore_value``."""
    shifted = (lab + 1).astype(np.float32)  # 0 marks "outside" after the warp
    out = cv2.warpAffine(shifted, matrix, size, flags=cv2.INTER_NEAREST, borderValue=0.0).astype(np.int64)
    return np.where(out == 0, ignore_value, out - 1)


def augment_slice(
    image: np.ndarray, label: Optional[np.ndarray], max_angle: float, ignore_value: int
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """SSL4MIS ``RandomGenerator`` (before its resize): rot90+flip with p=0.5, else rotation with p=0.5."""
    if random.random() > 0.5:
        k, axis = random.randint(0, 3), random.randint(0, 1)
        image = np.flip(np.rot90(image, k), axis=axis)
        label = None if label is None else np.flip(np.rot90(label, k), axis=axis)
    elif random.random() > 0.5 and max_angle > 0:
        angle = random.uniform(-max_angle, max_angle)
        h, w = image.shape[:2]
        matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
        warped = cv2.warpAffine(np.ascontiguousarray(image), matrix, (w, h), flags=cv2.INTER_LINEAR)
        image = warped.reshape(image.shape)
        label = None if label is None else _warp_label(label, matrix, (w, h), ignore_value)
    return np.ascontiguousarray(image), None if label is None else np.ascontiguousarray(label)


def resize_slice(
    image: np.ndarray, label: Optional[np.ndarray], size: Tuple[int, int]
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Resize to ``size`` = (H, W): bilinear image, nearest label; (0, 0) keeps the size."""
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0 or image.shape[:2] == (h, w):
        return image, label
    out = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, image.shape[2])
    if label is not None:
        label = cv2.resize(label.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int64)
    return out, label


class SemanticSliceMapper:
    """Dataset dict -> ``{"image": CxHxW float tensor, "sem_seg": HxW long tensor (when a map exists), ...}``."""

    def __init__(self, cfg: CfgNode, is_train: bool = True, require_labels: bool = False):
        self.is_train, self.require_labels = is_train, require_labels
        self.channels = len(cfg.MODEL.PIXEL_MEAN)
        self.num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.ignore_value = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        self.size = tuple(cfg.INPUT.FIXED_SIZE)
        self.max_angle = float(cfg.INPUT.ROTATION_ANGLE)
        self.augment = is_train and cfg.INPUT.SLICE_AUGMENT

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        d = copy.deepcopy(dataset_dict)
        image = read_scaled_image(d["file_name"], self.channels)
        label = None
        if "sem_seg_file_name" in d:
            label = read_label_map(d["sem_seg_file_name"], self.num_classes, self.ignore_value)
            if label.shape != image.shape[:2]:
                raise ValueError(f"{d['sem_seg_file_name']}: label map {label.shape} does not match image "
                                 f"{d['file_name']} {image.shape[:2]}")
        elif self.require_labels:
            raise ValueError(f"{d['file_name']}: a labeled data set needs 'sem_seg_file_name'")
        d.setdefault("height", image.shape[0])
        d.setdefault("width", image.shape[1])
        if self.augment:
            image, label = augment_slice(image, label, self.max_angle, self.ignore_value)
        image, label = resize_slice(image, label, self.size)
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if label is not None:
            d["sem_seg"] = torch.as_tensor(label, dtype=torch.long)
        return d


@DATASET_MAPPERS.register("semantic_slice")
def build_slice_mapper(cfg: CfgNode, is_train: bool) -> SemanticSliceMapper:
    """``INPUT.DATASET_MAPPER_NAME semantic_slice``: image + label map (labels required in training)."""
    return SemanticSliceMapper(cfg, is_train, require_labels=is_train)


def build_weak_slice_mapper(cfg: CfgNode) -> SemanticSliceMapper:
    """Weak/unlabeled images of the semantic teacher-student models go through the same slice mapper (scribble
    maps, when the data set has them, come along as ``sem_seg``)."""
    return SemanticSliceMapper(cfg, True)


for _arch in ("LCCMeanTeacherSegmentor", "MixedSupervisionSegmentor"):
    register_unlabeled_mapper(_arch)(build_weak_slice_mapper)
