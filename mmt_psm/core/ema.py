"""Exponential-moving-average (EMA) teacher: decay schedule, fused in-place update, and the hook that runs
them after every step (the DDP BatchNorm-statistics average runs before it, for every model:
:mod:`mmt_psm.core.step_guards`).

The teacher is ``t <- decay_t * t + (1 - decay_t) * s`` over every parameter and every floating buffer (so BN
running statistics follow the student too); integer/bool buffers (e.g. BN ``num_batches_tracked``) are copied.
The schedule ``decay_t = min(1 - 1/(t+1), decay)`` is the one of the authors' ``MTtrainer.update_teacher``
(and of Tarvainen & Valpola's Mean Teacher): early on the teacher tracks the student closely, later it
averages.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.layers import NaiveSyncBatchNorm
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "ema_decay", "ema_update_", "copy_student_to_teacher_", "EMATeacherHook", "unwrap_model",
    "rank_local_norm_buffers", "average_across_ranks_", "is_rank_local_norm", "norm_buffers_of",
]


def ema_decay(iteration: int, decay: float) -> float:
    """Decay used at ``iteration`` (counted from the first EMA update): ``min(1 - 1/(t+1), decay)``."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    return min(1.0 - 1.0 / (iteration + 1.0), float(decay))


def _unwrap(module: nn.Module) -> nn.Module:
    """Strip (Distributed)DataParallel wrappers so names match the unwrapped teacher."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


_Pairs = List[Tuple[torch.Tensor, torch.Tensor]]


def _paired_tensors(teacher: nn.Module, student: nn.Module) -> Tuple[_Pairs, _Pairs]:
    """(teacher, student) tensor pairs by name: (floating params+buffers, non-floating buffers).

    Raises ``KeyError`` when the two modules do not have the same parameter/buffer names or shapes.
    """
    teacher, student = _unwrap(teacher), _unwrap(student)
    t_items: Dict[str, torch.Tensor] = dict(teacher.named_parameters())
    s_items: Dict[str, torch.Tensor] = dict(student.named_parameters())
    t_items.update({"buffer:" + k: v for k, v in teacher.named_buffers()})
    s_items.update({"buffer:" + k: v for k, v in student.named_buffers()})
    if t_items.keys() != s_items.keys():
        missing = sorted(set(t_items) ^ set(s_items))[:10]
        raise KeyError(f"teacher and student differ in parameters/buffers, e.g. {missing}")
    floating, other = [], []
    for name, t in t_items.items():
        s = s_items[name]
        if t.shape != s.shape:
            raise KeyError(f"shape mismatch for {name}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}")
        (floating if t.is_floating_point() else other).append((t, s))
    return floating, other


def _as_like(src: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``src`` detached, on ``ref``'s device and dtype (no copy when they already match)."""
    return src.detach().to(device=ref.device, dtype=ref.dtype)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """In place: ``t = decay * t + (1 - decay) * s`` for params and floating buffers; copy the other buffers.

    Pass unwrapped modules (DDP wrappers are stripped anyway). Teacher tensors keep their own dtype (fp32
    teacher with an AMP/half student works: student values are cast to the teacher's dtype and device first).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    floating, other = _paired_tensors(teacher, student)
    if floating:
        t_list = [t for t, _ in floating]
        s_list = [_as_like(s, t) for t, s in floating]
        torch._foreach_mul_(t_list, decay)
        torch._foreach_add_(t_list, s_list, alpha=1.0 - decay)
    for t, s in other:
        t.copy_(s)


@torch.no_grad()
def copy_student_to_teacher_(teacher: nn.Module, student: nn.Module) -> None:
    """In place: every teacher parameter and buffer becomes an exact copy of the student's."""
    floating, other = _paired_tensors(teacher, student)
    for t, s in floating + other:
        t.copy_(s)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_rank_local_norm(m: nn.Module) -> bool:
    """A BatchNorm layer whose running statistics each DDP rank updates on its own (plain BN; SyncBN variants
    update theirs from global batch statistics)."""
    return isinstance(m, _BatchNorm) and not isinstance(m, (nn.SyncBatchNorm, NaiveSyncBatchNorm))


def norm_buffers_of(m: nn.Module) -> List[torch.Tensor]:
    """The floating running statistics (mean, var) of one BatchNorm layer (none when it tracks none)."""
    return [b for b in (m.running_mean, m.running_var) if b is not None and b.is_floating_point()]


def rank_local_norm_buffers(module: nn.Module) -> List[torch.Tensor]:
    """Floating running statistics of the BatchNorm layers in ``module`` that each DDP rank updates on its own
    (plain BN; SyncBN variants already update theirs from global batch statistics)."""
    return [b for m in module.modules() if is_rank_local_norm(m) for b in norm_buffers_of(m)]


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
    student's plain-BatchNorm running statistics are per rank. The Trainer's
    :class:`~mmt_psm.core.step_guards.NormStatisticsHook`, which runs before this one, averages them across ranks
    for every model, so the student, and the teacher averaged from it, stay one model on every rank.
    A step it marks non-finite (``trainer.nonfinite_step``: e.g. an fp16 overflow the GradScaler skipped) updates
    no teacher; a burn-in copy due on such a step happens after the next finite step.
    """

    def __init__(self, decay: float, start_iter: int, burn_in_iters: int, copy_at_burn_in: bool):
        self.decay, self.start_iter = float(decay), int(start_iter)
        self.burn_in_iters, self.copy_at_burn_in = int(burn_in_iters), bool(copy_at_burn_in)
        self._copy_pending = False

    def after_step(self) -> None:
        it = self.trainer.iter  # the iteration that just finished
        model = unwrap_model(self.trainer.model)
        copy_now = self.copy_at_burn_in and self.burn_in_iters > 0 and it + 1 == self.burn_in_iters
        if getattr(self.trainer, "nonfinite_step", False):  # the student is not this step's: keep the teacher
            self._copy_pending = self._copy_pending or copy_now
            return
        if copy_now or self._copy_pending:
            self._copy_pending = False
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
