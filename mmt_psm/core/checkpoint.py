"""Training state and checkpoints: a DetectionCheckpointer that writes atomically and loads plain detector weights
into teacher-student models, and the hook that checkpoints what Detectron2 does not (data seed, RNG states)."""
from __future__ import annotations

import os
import random
from typing import Any, Dict

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from mmt_psm.core.atomic import save_torch, write_text


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


def _numpy_state_to_tensors(state: tuple) -> tuple:
    kind, key, pos, has_gauss, gauss = state
    return kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


class TrainingStateHook(HookBase):
    """Checkpoints what Detectron2 does not: the data seed and the python/numpy/torch(/CUDA) RNG states,
    so that ``--resume`` continues exactly like an uninterrupted run.

    A run that does not resume re-seeds every RNG with ``SEED`` (+ rank) when training starts. Building a
    teacher or a second data stream draws random numbers, so without this a teacher-student run would sample
    other RPN / ROI proposals and dropout masks than a supervised run of the same seed from its first step,
    and its burn-in would drift from the supervised run's first iterations (BENCHMARKS.md measures it)."""

    def state_dict(self) -> Dict[str, Any]:
        state = {
            "data_seed": self.trainer.data_seed,
            "python_rng": random.getstate(),
            # numpy's key array as a tensor: checkpoints stay loadable with torch.load(weights_only=True)
            "numpy_rng": _numpy_state_to_tensors(np.random.get_state()),
            "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        # RNG states are applied in before_train: resuming rebuilds the data loader, which draws from torch's RNG
        self.trainer.data_seed = int(state["data_seed"])
        self._pending = state

    def before_train(self) -> None:
        state = getattr(self, "_pending", None)
        if state is None:
            seed = int(self.trainer.cfg.SEED)
            if seed >= 0:  # SEED < 0: Detectron2 drew a random seed at set-up; there is nothing to align
                seed_all_rng(seed + comm.get_rank())
            return
        random.setstate(state["python_rng"])
        kind, key, pos, has_gauss, gauss = state["numpy_rng"]
        np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self._pending = None
