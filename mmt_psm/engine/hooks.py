"""Training hooks: the EMA teacher update and the exact-resume state (RNG + data seed)."""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch
from detectron2.engine import HookBase
from torch.nn.parallel import DistributedDataParallel

from mmt_psm.modeling.ema import copy_student_to_teacher_, ema_decay, ema_update_


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class EMATeacherHook(HookBase):
    """After each step: teacher <- EMA of student, with ``decay_t = min(1 - 1/(t+1), decay)`` from
    ``start_iter``; at the end of burn-in the teacher becomes a copy of the student (when enabled).

    The model must expose ``teacher_student_pairs()``: the (teacher, student) module pairs to average.
    """

    def __init__(self, decay: float, start_iter: int, burn_in_iters: int, copy_at_burn_in: bool):
        self.decay, self.start_iter = float(decay), int(start_iter)
        self.burn_in_iters, self.copy_at_burn_in = int(burn_in_iters), bool(copy_at_burn_in)

    def after_step(self) -> None:
        it = self.trainer.iter  # the iteration that just finished
        model = unwrap_model(self.trainer.model)
        if self.copy_at_burn_in and self.burn_in_iters > 0 and it + 1 == self.burn_in_iters:
            for teacher, student in model.teacher_student_pairs():
                copy_student_to_teacher_(teacher, student)
            decay = 0.0
        elif it >= self.start_iter:
            decay = ema_decay(it - self.start_iter, self.decay)
            for teacher, student in model.teacher_student_pairs():
                ema_update_(teacher, student, decay)
        else:
            return
        self.trainer.storage.put_scalar("ema_decay", decay, smoothing_hint=False)


def _numpy_state_to_tensors(state: tuple) -> tuple:
    kind, key, pos, has_gauss, gauss = state
    return kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


class TrainingStateHook(HookBase):
    """Checkpoints what Detectron2 does not: the data seed and the python/numpy/torch(/CUDA) RNG states,
    so that ``--resume`` continues exactly like an uninterrupted run."""

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
            return
        random.setstate(state["python_rng"])
        kind, key, pos, has_gauss, gauss = state["numpy_rng"]
        np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self._pending = None
