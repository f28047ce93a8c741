"""A DetectionCheckpointer that writes atomically and loads plain detector weights into teacher-student models."""
from __future__ import annotations

import os
from typing import Any, Dict

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

from ..utils.atomic import save_torch, write_text


class AtomicCheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer with two additions.

    - ``save``: an interrupted save never leaves a truncated ``.pth`` (or a ``last_checkpoint`` pointing at one,
      or a half-written ``last_checkpoint``): each file goes to a temp file renamed into place.
    - ``load`` of a plain detector checkpoint (``MODEL.WEIGHTS``: a supervised run, a COCO model, an ImageNet
      backbone) into a teacher-student model fills both ``student.*`` and ``teacher.*``, keeping Detectron2's
      name-matching heuristics and its skipping of shape-mismatched keys (e.g. another number of classes).
    """

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
        save_torch(save_file, data)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at ``last_filename_basename`` (temp file + rename: never half-written)."""
        path = os.path.join(self.save_dir, "last_checkpoint")
        write_text(path, last_filename_basename)

    def _load_model(self, checkpoint: Dict[str, Any]):
        model = self.model
        state = checkpoint["model"]
        if hasattr(model, "teacher_student_pairs") and not any(k.startswith("student.") for k in state):
            if checkpoint.get("matching_heuristics", False):
                self._convert_ndarray_to_tensor(state)
                state = align_and_update_state_dicts(
                    model.student.state_dict(), state, c2_conversion=checkpoint.get("__author__") == "Caffe2"
                )
                checkpoint["matching_heuristics"] = False
            checkpoint["model"] = {f"{part}.{k}": v for k, v in state.items() for part in ("student", "teacher")}
        return super()._load_model(checkpoint)
