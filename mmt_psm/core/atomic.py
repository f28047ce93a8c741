"""Atomic file writes: a reader (or a resumed run) never sees a half-written file, and a failed write keeps the
previous file whole. Every writer goes through :func:`atomic_path`: write a hidden temp file beside the target,
then ``os.replace`` it over the target (atomic on POSIX and Windows within one file system)."""
from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

__all__ = ["atomic_path", "write_bytes", "write_text", "write_json", "write_image", "save_torch"]


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temp path beside ``path`` for the caller to write; on a clean exit it is renamed over ``path``.

    The temp name is hidden (``.name.tmp<pid>-<thread><ext>``) and keeps the extension, so ``cv2.imwrite``
    picks the format and directory listings (``*.png``, Detectron2's ``*.pth``) do not show it. On any
    exception, KeyboardInterrupt included, the temp file is removed and ``path`` is untouched. Creates the folder.
    """
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(directory, f".{stem}.tmp{os.getpid()}-{threading.get_ident()}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """``write(f)`` on a binary file object, flushed and fsynced, then renamed over ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str, obj: Any, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON (+ newline) to ``path`` atomically; ``indent=None`` for a compact file."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_image(path: str, image: np.ndarray) -> None:
    """``cv2.imwrite`` atomically, in the format of ``path``'s extension; an OSError naming ``path`` when OpenCV
    cannot encode or write it (``cv2.imwrite`` returns False or raises ``cv2.error``)."""
    import cv2

    problem = f"cannot write image {path} (shape {image.shape}, dtype {image.dtype})"
    with atomic_path(path) as tmp:
        try:
            written = cv2.imwrite(tmp, np.ascontiguousarray(image))
        except cv2.error as e:  # e.g. a channel count the format cannot hold
            raise OSError(f"{problem}: {str(e).strip().splitlines()[-1]}") from e
        if not written:
            raise OSError(problem)


def save_torch(path: str, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    write_bytes(path, lambda f: torch.save(obj, f))
