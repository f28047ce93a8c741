"""Task-specific libraries imported where they are used, so that one task's missing dependency never stops
another task (``import mmt_psm`` imports every task to register it).

    binary = optional_import("medpy.metric.binary", "medpy", "the ACDC volume metrics (semantic)")

Which task needs which package: ``setup.py``'s ``extras_require``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["optional_import"]


def optional_import(module: str, package: str, task: str) -> ModuleType:
    """``importlib.import_module(module)``; when it is missing, an ``ImportError`` naming the pip ``package`` and the
    ``task`` that needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{task} needs the Python package {package!r} (module {module!r} could not be imported: {e}); "
            f"install it with: pip install {package}"
        ) from e
