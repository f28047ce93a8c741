"""Procedural Pap-smear-like images with exact, overlapping cytoplasm and nucleus masks.

This is the project's embedded default data set: it needs no download, is fully determined by a seed, and is
small enough for a CPU training run of a few minutes (``make quickstart``). It imitates what makes the ISBI
overlapping-cervical-cell data hard: translucent cytoplasm that overlaps (masks are amodal, i.e. each cell's
full extent, so masks of different cells overlap), darker nuclei, a textured background, blur and noise.

Image formation is multiplicative (Beer-Lambert-like transmission): every layer a ray passes through scales
the intensity, so overlapping cytoplasm looks darker than either cell alone.

On disk (``write_synthetic_dataset``)::

    out_dir/images/{train,test,unlabeled}_<i>.png
    out_dir/train.json, out_dir/test.json      COCO instances, RLE masks, category 1 cytoplasm, 2 nucleus
    out_dir/unlabeled.json                     COCO images only (no annotations)

``file_name`` in the JSON files is relative to ``out_dir/images``. Image ids are unique across the three
files (``split index * 1_000_000 + i + 1``) so splits can be combined, and every image is generated from its
own seed ``(seed, split, i)``: changing the number of training images does not change the test images.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import cv2
import numpy as np
from scipy import ndimage

from mmt_psm.instance.coco_io import image_record, masks_to_annotations, write_coco_json

__all__ = ["SyntheticSample", "generate_sample", "write_synthetic_dataset", "SPLITS"]

# Split name -> index used both for the per-image seed and the image-id offset.
SPLITS: Dict[str, int] = {"train": 0, "test": 1, "unlabeled": 2}
_ID_OFFSET = 1_000_000


@dataclass
class SyntheticSample:
    """One generated image and its instance masks (cell k owns ``cytoplasm[k]`` and ``nuclei[k]``)."""

    image: np.ndarray  # (H, W) uint8
    cytoplasm: np.ndarray  # (N, H, W) bool, may overlap each other
    nuclei: np.ndarray  # (N, H, W) bool, nuclei[k] is inside cytoplasm[k]


def _blob_mask(
    rng: np.random.Generator,
    shape: Tuple[int, int],
    center: Tuple[float, float],
    axes: Tuple[float, float],
    angle: float,
    roughness: float,
) -> np.ndarray:
    """Boolean mask of an ellipse whose radius is perturbed by low-frequency radial noise (harmonics 2-5).

    Only the bounding box of the blob is evaluated, so the cost is proportional to the blob's area.
    """
    h, w = shape
    cy, cx = center
    a, b = axes
    # Harmonic perturbation r(theta) *= 1 + sum_k c_k cos(k theta + phi_k); total amplitude <= roughness.
    ks = np.arange(2, 6)
    amps = rng.uniform(0.0, 1.0, size=ks.size) / ks
    amps *= roughness / max(amps.sum(), 1e-9)
    phases = rng.uniform(0.0, 2 * np.pi, size=ks.size)
    rmax = max(a, b) * (1.0 + roughness) + 1.0
    y0, y1 = max(int(np.floor(cy - rmax)), 0), min(int(np.ceil(cy + rmax)) + 1, h)
    x0, x1 = max(int(np.floor(cx - rmax)), 0), min(int(np.ceil(cx + rmax)) + 1, w)
    mask = np.zeros((h, w), dtype=bool)
    if y0 >= y1 or x0 >= x1:
        return mask
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy  # coordinates along the ellipse axes
    theta = np.arctan2(v, u)
    dist = np.hypot(u, v)
    r_ellipse = a * b / np.sqrt((b * np.cos(theta)) ** 2 + (a * np.sin(theta)) ** 2)
    pert = 1.0 + (amps[:, None, None] * np.cos(ks[:, None, None] * theta + phases[:, None, None])).sum(0)
    mask[y0:y1, x0:x1] = dist <= r_ellipse * pert
    return mask


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std low-frequency noise field (Gaussian-filtered white noise)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-9)


def generate_sample(
    rng: np.random.Generator,
    height: int = 256,
    width: int = 256,
    min_cells: int = 2,
    max_cells: int = 8,
) -> SyntheticSample:
    """One image with ``min_cells..max_cells`` overlapping cells; fully determined by ``rng``'s state.

    Cells are scattered around one or two cluster centres so that cytoplasm overlaps are common. Sizes scale
    with the image (cytoplasm radius ~9-20 % of the shorter side, nucleus ~15-25 % of its cell).
    """
    shape = (height, width)
    scale = min(height, width)
    n = int(rng.integers(min_cells, max_cells + 1))

    num_clusters = int(rng.integers(1, 3))
    margin = 0.2 * scale
    cluster_y = rng.uniform(margin, height - margin, num_clusters)
    cluster_x = rng.uniform(margin, width - margin, num_clusters)
    clusters = np.stack([cluster_y, cluster_x], axis=1)

    cyto: List[np.ndarray] = []
    nuc: List[np.ndarray] = []
    cyto_t: List[float] = []
    nuc_t: List[float] = []
    while len(cyto) < n:
        cluster = clusters[rng.integers(num_clusters)]
        r_mean = rng.uniform(0.09, 0.2) * scale
        axes = (r_mean * rng.uniform(1.0, 1.35), r_mean * rng.uniform(0.7, 1.0))
        center = cluster + rng.normal(0.0, 0.18 * scale, size=2)
        center = np.clip(center, [0.1 * height, 0.1 * width], [0.9 * height, 0.9 * width])
        c_angle, c_rough = rng.uniform(0, np.pi), rng.uniform(0.05, 0.2)
        c_mask = _blob_mask(rng, shape, (center[0], center[1]), axes, c_angle, c_rough)
        # Nucleus: a small, nearly round blob near the cell centre, clipped to its cytoplasm.
        nr = r_mean * rng.uniform(0.15, 0.25)
        n_dir = rng.uniform(0, 2 * np.pi)
        n_center = center + rng.uniform(0, 0.3 * r_mean) * np.array([np.sin(n_dir), np.cos(n_dir)])
        n_axes = (nr * rng.uniform(1.0, 1.25), nr * rng.uniform(0.8, 1.0))
        n_angle = rng.uniform(0, np.pi)
        n_mask = _blob_mask(rng, shape, (n_center[0], n_center[1]), n_axes, n_angle, 0.08) & c_mask
        if n_mask.sum() < 4 or c_mask.sum() < 16:
            continue  # degenerate (e.g. mostly outside the image): draw again, still deterministic
        cyto.append(c_mask)
        nuc.append(n_mask)
        cyto_t.append(rng.uniform(0.72, 0.9))
        nuc_t.append(rng.uniform(0.35, 0.55))

    # Multiplicative image formation in log space: log I = log(bg) + sum_k mask_k * log(t_k) (+ texture).
    background = 0.88 + 0.04 * _smooth_noise(rng, shape, sigma=0.15 * scale)
    log_img = np.log(np.clip(background, 0.05, 1.0))
    texture = _smooth_noise(rng, shape, sigma=2.0)
    for c_mask, n_mask, tc, tn in zip(cyto, nuc, cyto_t, nuc_t):
        log_img += c_mask * (np.log(tc) + 0.04 * texture)
        log_img += n_mask * (np.log(tn) + 0.08 * texture)
    img = np.exp(log_img)
    img = cv2.GaussianBlur(img, ksize=(0, 0), sigmaX=rng.uniform(0.6, 1.2))
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.025), size=shape)
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return SyntheticSample(image=image, cytoplasm=np.stack(cyto), nuclei=np.stack(nuc))


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: independent of how many images each split has."""
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def image_id_for(split: str, index: int) -> int:
    """Globally unique image id of image ``index`` of ``split`` (unique across train/test/unlabeled)."""
    return SPLITS[split] * _ID_OFFSET + int(index) + 1


def write_synthetic_dataset(
    out_dir: str,
    num_train: int,
    num_test: int,
    num_unlabeled: int,
    size: int = 256,
    seed: int = 0,
) -> Dict[str, str]:
    """Write the synthetic data set (PNGs + train/test/unlabeled COCO JSON) to ``out_dir``.

    Returns ``{split: json_path}`` (+ ``unlabeled_gt``: the unlabeled images' held-back annotations, read only
    by the pseudo-label monitor). The image root for all JSON files is ``out_dir/images``.
    """
    counts = {"train": num_train, "test": num_test, "unlabeled": num_unlabeled}
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    info = {"description": "mmt_psm synthetic overlapping cells", "size": size, "seed": seed}
    paths: Dict[str, str] = {}
    for split, count in counts.items():
        images, anns, held_back = [], [], []
        for i in range(count):
            sample = generate_sample(sample_rng(seed, split, i), height=size, width=size)
            file_name = f"{split}_{i}.png"
            if not cv2.imwrite(os.path.join(image_dir, file_name), sample.image):
                raise OSError(f"could not write {os.path.join(image_dir, file_name)}")
            image_id = image_id_for(split, i)
            images.append(image_record(image_id, file_name, size, size))
            target = held_back if split == "unlabeled" else anns
            target += masks_to_annotations(sample.cytoplasm, 1, image_id, len(target) + 1)
            target += masks_to_annotations(sample.nuclei, 2, image_id, len(target) + 1)
        paths[split] = os.path.join(out_dir, f"{split}.json")
        write_coco_json(paths[split], images, anns, info=dict(info, split=split))
        if split == "unlabeled":
            paths["unlabeled_gt"] = os.path.join(out_dir, "unlabeled_gt.json")
            write_coco_json(paths["unlabeled_gt"], images, held_back, info=dict(info, split="unlabeled_gt"))
    return paths
