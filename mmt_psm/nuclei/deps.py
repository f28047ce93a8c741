"""The PSM nuclei task's own libraries (scikit-image, scikit-learn), imported where they are used: the other tasks
train without them (``import mmt_psm`` imports this task to register it)."""
from __future__ import annotations

from types import ModuleType

from mmt_psm.core.optional import optional_import

__all__ = ["skimage", "sklearn_cluster"]

TASK = "the PSM nuclei task (mmt_psm.nuclei)"


def skimage(submodule: str) -> ModuleType:
    """``skimage.<submodule>`` (e.g. ``"segmentation"``), or an ImportError naming scikit-image."""
    return optional_import(f"skimage.{submodule}", "scikit-image", TASK)


def sklearn_cluster() -> ModuleType:
    """``sklearn.cluster``, or an ImportError naming scikit-learn."""
    return optional_import("sklearn.cluster", "scikit-learn", TASK)
