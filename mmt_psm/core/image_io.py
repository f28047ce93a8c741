"""The one image reader of every task: decodes a file as stored (8/16-bit, 1-4 channels) with errors that name
the file, and the image extensions the project lists folders with.

Each task then maps intensities its own way (documented where it does): cells rescale a 16-bit image per image
(min-max, ``mmt_psm.instance.mapper``), cardiac slices and H&E tiles scale the full 16-bit range
(``mmt_psm.semantic.slice_mapper``, ``mmt_psm.nuclei.tile_io``).
"""
from __future__ import annotations

import glob
import os
from typing import List

import cv2
import numpy as np
from detectron2.utils.file_io import PathManager

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "read_image_file", "is_image_file", "list_image_files"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageReadError(OSError, ValueError):
    """A file that exists but does not decode as an image (an ``OSError`` and a ``ValueError``)."""


def is_image_file(path: str) -> bool:
    """True for a file name with one of ``IMAGE_EXTENSIONS`` (any case)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def read_image_file(path: str) -> np.ndarray:
    """The decoded image as stored (``cv2.IMREAD_UNCHANGED``: BGR(A) channel order, uint8 or uint16).

    Missing file: ``FileNotFoundError``; empty, corrupt or not an image: :class:`ImageReadError`."""
    if not PathManager.isfile(path):
        raise FileNotFoundError(f"cannot read image {path}: image file not found")
    with PathManager.open(path, "rb") as f:
        data = np.frombuffer(f.read(), np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ImageReadError(f"cannot read image {path}: cannot decode image file (corrupt, empty or unsupported "
                             "format)")
    return img


def list_image_files(source: str) -> List[str]:
    """Sorted image files of a folder (not recursive) or a glob pattern (``**`` recurses)."""
    if os.path.isdir(source):
        files = [os.path.join(source, f) for f in os.listdir(source)]
    else:
        files = glob.glob(source, recursive=True)
    return sorted(f for f in files if os.path.isfile(f) and is_image_file(f))
