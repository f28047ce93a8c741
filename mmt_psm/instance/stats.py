"""Statistics of a data set that pick a config: pixel mean/std, image sizes, object sizes, objects per image.

Images are read as the model reads them (``read_image_checked``: 16-bit rescaled per image, gray replicated to
3 channels, channel order ``INPUT.FORMAT``), so ``MODEL.PIXEL_MEAN``/``PIXEL_STD`` can be copied as printed.
Object size = sqrt(mask area) in pixels of the original image (the box when there is no mask).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from mmt_psm.instance.coco_io import annotation_to_mask
from mmt_psm.instance.mapper import read_image_checked

__all__ = ["dataset_stats", "suggest_anchor_sizes", "format_stats"]

PERCENTILES = (5, 25, 50, 75, 95)


def _object_size(ann: Dict[str, Any], h: int, w: int) -> float:
    segm = ann.get("segmentation")
    if segm:
        return math.sqrt(float(annotation_to_mask(segm, h, w).sum()))
    x0, y0, bw, bh = ann["bbox"][:4]  # XYWH (Detectron2's COCO loader)
    return math.sqrt(max(float(bw) * float(bh), 0.0))


def suggest_anchor_sizes(object_sizes: Sequence[float], scale: float = 1.0, levels: int = 5) -> List[List[int]]:
    """One anchor size per FPN level (doubling), the smallest the power of two at or below the 5th percentile
    of the object sizes times ``scale`` (the resize factor of training), at least 8."""
    if len(object_sizes) == 0:
        return [[32 * 2**k] for k in range(levels)]
    p5 = float(np.percentile(np.asarray(object_sizes) * scale, 5))
    first = max(8, 2 ** int(math.floor(math.log2(max(p5, 1.0)))))
    return [[first * 2**k] for k in range(levels)]


def dataset_stats(names: Sequence[str], image_format: str = "BGR", max_images: Optional[int] = None,
                  min_size_train: Optional[int] = None) -> Dict[str, Any]:
    """Statistics of the registered data sets ``names`` together (see the module docstring).

    ``max_images`` limits the images read for pixel statistics (evenly spaced); ``min_size_train`` (the
    shortest edge after resizing) scales object sizes for the anchor suggestion."""
    dicts = [d for n in names for d in DatasetCatalog.get(n)]
    if not dicts:
        raise ValueError(f"data sets {list(names)} are empty")
    classes = MetadataCatalog.get(names[0]).get("thing_classes", None) or []
    picks = range(len(dicts))
    if max_images and len(dicts) > max_images:
        picks = np.linspace(0, len(dicts) - 1, max_images).round().astype(int)
    total, total_sq, n_pix = np.zeros(3), np.zeros(3), 0
    for i in picks:
        img = read_image_checked(dicts[i]["file_name"], image_format).reshape(-1, 3).astype(np.float64)
        total += img.sum(0)
        total_sq += (img**2).sum(0)
        n_pix += img.shape[0]
    mean = total / n_pix
    std = np.sqrt(np.maximum(total_sq / n_pix - mean**2, 0.0))
    heights = np.array([d["height"] for d in dicts])
    widths = np.array([d["width"] for d in dicts])
    sizes: Dict[int, List[float]] = {}
    per_image = []
    for d in dicts:
        anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
        per_image.append(len(anns))
        for a in anns:
            sizes.setdefault(int(a["category_id"]), []).append(_object_size(a, d["height"], d["width"]))
    all_sizes = [s for v in sizes.values() for s in v]
    scale = float(min_size_train) / float(np.median(np.minimum(heights, widths))) if min_size_train else 1.0

    def pct(values: Sequence[float]) -> Dict[str, float]:
        return {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES} if len(values) else {}

    return {
        "datasets": list(names),
        "num_images": len(dicts),
        "pixel_images": len(picks),
        "format": image_format,
        "pixel_mean": [round(float(v), 3) for v in mean],
        "pixel_std": [round(float(v), 3) for v in std],
        "height": {"min": int(heights.min()), "median": float(np.median(heights)), "max": int(heights.max())},
        "width": {"min": int(widths.min()), "median": float(np.median(widths)), "max": int(widths.max())},
        "num_objects": len(all_sizes),
        "objects_per_image": {"median": float(np.median(per_image)), "max": int(max(per_image))},
        "object_size": pct(all_sizes),
        "object_size_per_class": {
            (classes[c] if c < len(classes) else str(c)): pct(v) for c, v in sorted(sizes.items())
        },
        "resize_scale": scale,
        "anchor_sizes": suggest_anchor_sizes(all_sizes, scale),
    }


def format_stats(s: Dict[str, Any]) -> str:
    """A readable report with config lines to copy."""
    lines = [
        f"data sets: {', '.join(s['datasets'])}: {s['num_images']} images "
        f"(pixel statistics over {s['pixel_images']}), channel order {s['format']}",
        f"image height min/median/max: {s['height']['min']} / {s['height']['median']:g} / {s['height']['max']}",
        f"image width  min/median/max: {s['width']['min']} / {s['width']['median']:g} / {s['width']['max']}",
        f"objects: {s['num_objects']} ({s['objects_per_image']['median']:g} per image median, "
        f"{s['objects_per_image']['max']} max)",
    ]
    if s["object_size"]:
        lines.append("object size sqrt(area) px: " + ", ".join(f"{k} {v:.1f}" for k, v in s["object_size"].items()))
        for name, p in s["object_size_per_class"].items():
            lines.append(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in p.items()))
    lines += [
        "",
        "config lines (MODEL.PIXEL_MEAN/STD in INPUT.FORMAT order; anchors from the 5th percentile object"
        f" size x resize scale {s['resize_scale']:.3g}):",
        f"  MODEL.PIXEL_MEAN \"{s['pixel_mean']}\" MODEL.PIXEL_STD \"{s['pixel_std']}\"",
        f"  MODEL.ANCHOR_GENERATOR.SIZES \"{s['anchor_sizes']}\"",
        f"  TEST.DETECTIONS_PER_IMAGE {max(100, 2 * s['objects_per_image']['max'])}",
    ]
    return "\n".join(lines)
