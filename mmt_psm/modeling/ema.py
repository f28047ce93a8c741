"""Exponential-moving-average (EMA) teacher: decay schedule and fused in-place update.

The teacher is ``t <- decay_t * t + (1 - decay_t) * s`` over every parameter and every floating buffer (so BN
running statistics follow the student too); integer/bool buffers (e.g. BN ``num_batches_tracked``) are copied.
The schedule ``decay_t = min(1 - 1/(t+1), decay)`` is the one of the authors' ``MTtrainer.update_teacher``
(and of Tarvainen & Valpola's Mean Teacher): early on the teacher tracks the student closely, later it
averages.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

__all__ = ["ema_decay", "ema_update_", "copy_student_to_teacher_"]


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
