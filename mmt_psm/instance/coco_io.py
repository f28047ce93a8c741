"""COCO instance JSON with RLE masks: the one on-disk format of every cell data set in this project.

Converters (``datasets/prepare_*.py``) and the synthetic generator all write through these functions so that
category ids, RLE encoding and image records are identical everywhere.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util

from mmt_psm.core.atomic import write_json

# Category ids are fixed: 1 = cytoplasm, 2 = nucleus (0 is reserved by COCO tools for "no category").
CELL_CATEGORIES: List[Dict[str, Any]] = [
    {"id": 1, "name": "cytoplasm", "supercategory": "cell"},
    {"id": 2, "name": "nucleus", "supercategory": "cell"},
]


def annotation_to_mask(segm: Any, height: int, width: int) -> np.ndarray:
    """HxW bool mask of a Detectron2/COCO ``segmentation`` (RLE dict, uncompressed RLE or polygon list)."""
    if isinstance(segm, dict):
        if isinstance(segm["counts"], list):  # uncompressed RLE
            segm = mask_util.frPyObjects(segm, *segm["size"])
        mask = mask_util.decode(segm).astype(bool)
    elif isinstance(segm, list):
        # what Detectron2's polygons_to_bitmask does: rasterise each polygon, union them (none: empty mask)
        if segm:
            polys = [np.asarray(p, dtype=np.float64) for p in segm]
            mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, height, width))).astype(bool)
        else:
            mask = np.zeros((height, width), bool)
    else:
        raise ValueError(f"unsupported segmentation type {type(segm)}")
    if mask.shape != (height, width):
        raise ValueError(f"mask of shape {mask.shape} in an image of size {(height, width)}")
    return mask


def mask_to_rle(mask: np.ndarray) -> Dict[str, Any]:
    """Encode one boolean HxW mask as a JSON-serialisable COCO RLE (``counts`` as str)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def masks_to_annotations(
    masks: np.ndarray,
    category_id: int,
    image_id: int,
    first_ann_id: int,
) -> List[Dict[str, Any]]:
    """COCO annotations for a stack of (possibly overlapping) boolean masks of shape (N, H, W).

    Empty masks are skipped (a zero-area object cannot be evaluated or trained on).
    """
    anns: List[Dict[str, Any]] = []
    ann_id = first_ann_id
    for m in masks:
        m = np.asarray(m, dtype=bool)
        if not m.any():
            continue
        rle = mask_to_rle(m)
        x, y, w, h = mask_util.toBbox(rle).tolist()
        anns.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": int(category_id),
                "segmentation": rle,
                "area": float(mask_util.area(rle)),
                "bbox": [x, y, w, h],
                "iscrowd": 0,
            }
        )
        ann_id += 1
    return anns


def image_record(image_id: int, file_name: str, height: int, width: int) -> Dict[str, Any]:
    """A COCO ``images`` entry."""
    return {"id": int(image_id), "file_name": file_name, "height": int(height), "width": int(width)}


def write_coco_json(
    path: str,
    images: Sequence[Dict[str, Any]],
    annotations: Iterable[Dict[str, Any]],
    categories: Optional[Sequence[Dict[str, Any]]] = None,
    info: Optional[Dict[str, Any]] = None,
) -> None:
    """Write a COCO instance file atomically (temp file + rename), so a crash never leaves half a JSON."""
    data = {
        "info": info or {},
        "images": list(images),
        "annotations": list(annotations),
        "categories": list(categories if categories is not None else CELL_CATEGORIES),
    }
    write_json(path, data, indent=None)
