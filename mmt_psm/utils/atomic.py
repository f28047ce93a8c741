"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""
from __future__ import annotations

import json
import os
from typing import Any


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file and ``os.replace``; creates the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON (+ newline) to ``path`` atomically (``write_text``)."""
    write_text(path, json.dumps(obj, indent=1) + "\n")
