"""A DetectionCheckpointer whose files are written atomically (temp file + rename)."""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer


class AtomicCheckpointer(DetectionCheckpointer):
    """Same files and behaviour as Detectron2's checkpointer, but an interrupted save never leaves a truncated
    ``.pth`` (or a ``last_checkpoint`` pointing at one): the data goes to a temp file renamed into place."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.save_dir, prefix=f".{basename}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, save_file)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.tag_last_checkpoint(basename)
