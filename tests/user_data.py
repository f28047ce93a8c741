"""A user's own data as a new user brings it: one class (category id 7), RGB PNGs, polygon masks in a COCO
instance JSON, and a plain folder of unlabeled images (no JSON)."""
from __future__ import annotations

import json
import os
from typing import Dict, List

import cv2
import numpy as np

CATEGORY_ID = 7
CLASS_NAME = "cell"


def _polygon(cx: float, cy: float, rx: float, ry: float, n: int = 16) -> List[float]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1).round(1).reshape(-1).tolist()


def _image(rng: np.random.Generator, size: int, n_cells: int):
    """RGB image (uint8 HxWx3, RGB order) with ``n_cells`` ellipses and their polygons."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (230, 215, 225)
    polys = []
    for _ in range(n_cells):
        cx, cy = rng.uniform(16, size - 16, 2)
        rx, ry = rng.uniform(7, 14, 2)
        poly = _polygon(cx, cy, rx, ry)
        pts = np.asarray(poly).reshape(-1, 2).round().astype(np.int32)
        cv2.fillPoly(img, [pts], (int(rng.integers(90, 140)), 60, int(rng.integers(120, 170))))
        polys.append(poly)
    return img, polys


def write_user_dataset(root: str, n_train: int = 3, n_test: int = 2, n_unlabeled: int = 3, size: int = 128,
                       seed: int = 0) -> Dict[str, str]:
    """Write ``train.json``, ``test.json`` (images in ``images/``) and ``unlabeled/*.png``; returns the paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "unlabeled"), exist_ok=True)
    paths = {"image_root": os.path.join(root, "images"), "unlabeled": os.path.join(root, "unlabeled")}
    ann_id = 100
    for split, n, first_id in (("train", n_train, 1000), ("test", n_test, 2000)):
        images, anns = [], []
        for k in range(n):
            img, polys = _image(rng, size, 4)
            fn = f"{split}_{k}.png"
            cv2.imwrite(os.path.join(root, "images", fn), img[:, :, ::-1])
            images.append({"id": first_id + k, "file_name": fn, "height": size, "width": size})
            for poly in polys:
                xy = np.asarray(poly).reshape(-1, 2)
                x0, y0 = xy.min(0)
                w, h = xy.max(0) - xy.min(0)
                anns.append({"id": ann_id, "image_id": first_id + k, "category_id": CATEGORY_ID,
                             "segmentation": [poly], "bbox": [float(x0), float(y0), float(w), float(h)],
                             "area": float(w * h * np.pi / 4), "iscrowd": 0})
                ann_id += 1
        paths[split] = os.path.join(root, f"{split}.json")
        with open(paths[split], "w") as f:
            json.dump({"images": images, "annotations": anns,
                       "categories": [{"id": CATEGORY_ID, "name": CLASS_NAME}]}, f)
    for k in range(n_unlabeled):
        img, _ = _image(rng, size, 4)
        cv2.imwrite(os.path.join(root, "unlabeled", f"u{k}.png"), img[:, :, ::-1])
    return paths
