"""Reading a user's H&E tiles and the PSM label folders (no Detectron2 needed).

Why a module of its own: every PSM stage takes "a folder of H&E tiles" and must treat odd files the same way.
:func:`read_he_image` returns uint8 RGB for 8/16-bit PNG/TIFF/JPEG, drops an alpha channel, repeats a
grayscale image to 3 channels (with a warning: the colour prior then only sees darkness) and raises an error
naming the file for anything unreadable. :func:`list_images` refuses an empty folder and two files with one stem.

A PSM label folder holds ``index.json`` (written by the stage tools)::

    {"images": [{"stem", "file_name", "height", "width",
                 "pseudo_mask": "<stem>.png" | null, "voronoi": ... | null, "instances": ... | null}]}

with label paths relative to the index's folder.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional

import numpy as np

from mmt_psm.core.atomic import write_json
from mmt_psm.core.image_io import IMAGE_EXTENSIONS, read_image_file

__all__ = ["IMAGE_EXTENSIONS", "list_images", "read_he_image", "write_index", "read_index", "stem_of"]

logger = logging.getLogger(__name__)


def stem_of(path: str) -> str:
    """File name without folder and extension (the key of every PSM output)."""
    return os.path.splitext(os.path.basename(path))[0]


def list_images(folder: str) -> List[str]:
    """Sorted image files of ``folder`` (not recursive); errors for a missing/empty folder or duplicate stems."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"image folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    seen: Dict[str, str] = {}
    for f in files:
        s = stem_of(f)
        if s in seen:
            raise ValueError(f"{seen[s]} and {f} share the name {s!r}; PSM outputs are keyed by it: rename one")
        seen[s] = f
    return files


def read_he_image(path: str) -> np.ndarray:
    """HxWx3 uint8 RGB of an 8/16-bit image; alpha dropped, grayscale repeated (warning); errors name the file."""
    img = read_image_file(path)
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ValueError(f"{path}: unsupported image dtype {img.dtype} (expected 8- or 16-bit)")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        logger.warning(f"{path} is grayscale: repeated to RGB; the PSM colour prior sees only darkness")
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"{path}: expected a grayscale, RGB or RGBA image, got shape {img.shape}")
    if min(img.shape[:2]) < 8:
        raise ValueError(f"{path}: image {img.shape[:2]} is too small (at least 8 x 8 pixels)")
    return np.ascontiguousarray(img[:, :, 2::-1])  # BGR(A) -> RGB


def read_index(folder: str) -> Dict[str, Any]:
    """The ``index.json`` of a PSM label folder (empty record list when absent)."""
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        return {"images": []}
    with open(path) as f:
        return json.load(f)


def write_index(folder: str, records: List[Dict[str, Any]], extra: Optional[Dict[str, Any]] = None) -> str:
    """Write ``index.json`` atomically (a killed tool never leaves half a file); returns its path."""
    path = os.path.join(folder, "index.json")
    write_json(path, {"images": records, **(extra or {})})
    return path
