"""Training hooks: the EMA teacher update and the exact-resume state (RNG + data seed)."""
from __future__ import annotations

import random
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from mmt_psm.modeling.ema import copy_student_to_teacher_, ema_decay, ema_update_


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def rank_local_norm_buffers(module: nn.Module) -> List[torch.Tensor]:
    """Floating running statistics of the BatchNorm layers in ``module`` that each DDP rank updates on its own
    (plain BN; SyncBN variants already update theirs from global batch statistics)."""
    out = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and not isinstance(m, (nn.SyncBatchNorm, NaiveSyncBatchNorm)):
            out += [b for b in (m.running_mean, m.running_var) if b is not None and b.is_floating_point()]
    return out


@torch.no_grad()
def average_across_ranks_(tensors: List[torch.Tensor]) -> None:
    """In place: every tensor becomes its mean over the ranks of the default process group (one all-reduce per
    dtype/device). Identical on every rank afterwards. No-op outside a multi-process run."""
    if not tensors or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for t, avg in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(avg)


class EMATeacherHook(HookBase):
    """After each step: teacher <- EMA of student, with ``decay_t = min(1 - 1/(t+1), decay)`` from
    ``start_iter``; at the end of burn-in the teacher becomes a copy of the student (when enabled).

    The model must expose ``teacher_student_pairs()``: the (teacher, student) module pairs to average.

    Multi-GPU: DDP keeps parameters equal on every rank, but Detectron2 does not broadcast buffers, so a
    student's plain-BatchNorm running statistics are per rank (each rank's own images). Before the EMA step of
    every iteration, when the world size is > 1, this hook all-reduce-averages those statistics of every
    student module (mean of the per-rank running means/variances), so the student, and the teacher averaged
    from it, stay one model on every rank, and distributed evaluation of either uses one model. SyncBN layers
    are left alone (theirs are global already); GroupNorm/FrozenBN models have no such statistics.
    """

    def __init__(self, decay: float, start_iter: int, burn_in_iters: int, copy_at_burn_in: bool):
        self.decay, self.start_iter = float(decay), int(start_iter)
        self.burn_in_iters, self.copy_at_burn_in = int(burn_in_iters), bool(copy_at_burn_in)

    def after_step(self) -> None:
        it = self.trainer.iter  # the iteration that just finished
        model = unwrap_model(self.trainer.model)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # the same step on all ranks
            students = {id(s): s for _, s in model.teacher_student_pairs()}.values()
            average_across_ranks_([b for s in students for b in rank_local_norm_buffers(s)])
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
