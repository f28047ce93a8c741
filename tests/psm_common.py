"""Synthetic H&E-like tiles for the PSM tests: pink stroma with dark purple round nuclei at known places."""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import cv2
import numpy as np

# configs/psm/Base-PSM-UNet.yaml's overrides for the from-scratch U-Net and stage-1 ResNet (its default is the ImageNet
# MobileNetV2): the tests that shrink those networks to a few channels pass them first
SCRATCH = ["MODEL.BACKBONE.NAME", "build_unet_backbone", "MODEL.WEIGHTS", "",
           "MODEL.PIXEL_MEAN", "[170.0, 120.0, 165.0]", "MODEL.PIXEL_STD", "[40.0, 45.0, 35.0]",
           "PSM.SELF_SUP.ENCODER", "scratch"]

STROMA = (235, 170, 215)
NUCLEUS = (80, 45, 135)


def he_tile(size: Tuple[int, int] = (96, 96), centres: Sequence[Tuple[int, int]] = ((24, 24), (24, 70), (70, 40)),
            radius: int = 8, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 RGB tile, HxW uint16 instance map) with one disk nucleus per centre."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.empty((h, w, 3), np.float32)
    img[:] = STROMA
    inst = np.zeros((h, w), np.uint16)
    yy, xx = np.mgrid[:h, :w]
    for i, (cy, cx) in enumerate(centres, start=1):
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    img[inst > 0] = NUCLEUS
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), inst


def write_tiles(folder: str, n: int = 2, size: Tuple[int, int] = (96, 96), gt_folder: str = "") -> List[str]:
    """Write ``n`` tiles ``tile<i>.png`` (RGB on disk as PNG) and optionally their instance maps; paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        centres = [(int(rng.integers(12, size[0] - 12)), int(rng.integers(12, size[1] - 12))) for _ in range(4)]
        img, inst = he_tile(size, centres, seed=i)
        path = os.path.join(folder, f"tile{i}.png")
        cv2.imwrite(path, img[:, :, ::-1])
        if gt_folder:
            os.makedirs(gt_folder, exist_ok=True)
            cv2.imwrite(os.path.join(gt_folder, f"tile{i}.png"), inst)
        paths.append(path)
    return paths
