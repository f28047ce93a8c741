"""What keeps every rank one run, step after step: a non-finite loss on any rank stops every rank, and the
rank-local BatchNorm statistics of every model are averaged across ranks, except after a non-finite step, which
is undone for them instead.

- :func:`check_losses_finite` / :func:`install_finite_loss_check`: Detectron2 checks the losses on rank 0 only
  (``SimpleTrainer.write_metrics``), so the other ranks went on into the next collective and hung. Here, after the
  backward pass (whose gradient all-reduce every rank has reached) and before the optimizer step, each rank sums
  its count of non-finite loss terms in one all-reduce of one number; when it is not zero every rank gathers the
  offending terms and raises the same ``FloatingPointError``, naming the iteration, the ranks and the terms.
- :class:`NormStatisticsHook`: Detectron2 does not broadcast buffers under DDP, so plain BatchNorm running
  statistics are each rank's own. After every step this hook all-reduce-averages them over the ranks for the
  trained modules of every model (the students of a teacher-student model, the whole model otherwise; a teacher is
  the EMA of its student, see :class:`~mmt_psm.core.ema.EMATeacherHook`), so every rank evaluates and saves one
  model. SyncBN layers (global statistics already), FrozenBN and GroupNorm are left alone.
  With AMP, a step whose fp16 overflow makes the GradScaler skip the optimizer update still wrote inf/NaN into the
  BN running statistics. When any rank's trained parameters or rank-local BN statistics are not finite after a
  step, every rank restores its BN statistics to their values before the step, nothing is averaged, the step is
  counted in the scalar ``nonfinite_steps_skipped`` (cumulative) and ``trainer.nonfinite_step`` tells the EMA hook
  to leave the teacher alone. The flag travels in the statistics' all-reduce (no extra collective).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Mapping, Tuple

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mmt_psm.core.ema import is_rank_local_norm, norm_buffers_of, unwrap_model

__all__ = ["check_losses_finite", "install_finite_loss_check", "trained_modules", "NormStatisticsHook"]

logger = logging.getLogger(__name__)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_losses_finite(loss_dict: Mapping[str, torch.Tensor], iteration: int) -> None:
    """Raise ``FloatingPointError`` on every rank when a loss term is inf/NaN on any rank (the same message on all:
    iteration, ranks and terms). Multi-process: one all-reduce of one number per call, and a gather only when it
    raises. Call it at the same point of the step on every rank."""
    if not loss_dict:
        return
    values = torch.stack([v.detach().float().sum() for v in loss_dict.values()])
    bad = (~torch.isfinite(values)).sum().float().reshape(1)
    if _world() > 1:
        dist.all_reduce(bad)
    if bad.item() == 0:  # the step's one host sync of this check
        return
    mine = {k: v for k, v in zip(loss_dict.keys(), values.tolist()) if not math.isfinite(v)}
    per_rank = comm.all_gather(mine) if _world() > 1 else [mine]
    detail = "; ".join(f"rank {r}: {terms}" for r, terms in enumerate(per_rank) if terms)
    raise FloatingPointError(f"Loss became infinite or NaN at iteration={iteration} ({detail}); every rank stops")


def install_finite_loss_check(step_trainer) -> None:
    """Make Detectron2's Simple/AMPTrainer check the losses on every rank (:func:`check_losses_finite`) where it
    logs them: after ``backward``, before the optimizer step, in both ``run_step``s."""
    write = step_trainer._write_metrics

    def _write_metrics(loss_dict, data_time, *args, **kwargs):
        check_losses_finite(loss_dict, step_trainer.iter)
        return write(loss_dict, data_time, *args, **kwargs)

    step_trainer._write_metrics = _write_metrics


def trained_modules(model: nn.Module) -> Tuple[List[torch.Tensor], List[nn.Module]]:
    """(parameters, modules) of ``model`` that training updates: everything but the teachers of a model with
    ``teacher_student_pairs()`` (EMA copies of their students)."""
    model = unwrap_model(model)
    pairs = list(model.teacher_student_pairs()) if hasattr(model, "teacher_student_pairs") else []
    in_teacher = {id(m) for t, _ in pairs for m in t.modules()}
    teacher_params = {id(p) for t, _ in pairs for p in t.parameters()}
    modules = [m for m in model.modules() if id(m) not in in_teacher]
    params = [p for p in model.parameters() if id(p) not in teacher_params]
    return params, modules


class NormStatisticsHook(HookBase):
    """After every step (before the EMA teacher hook): undo the step for the BN statistics when any rank's trained
    model is not finite, else average the rank-local BN statistics across ranks (see the module docstring)."""

    def __init__(self):
        self.skipped = 0
        self._buffers: List[torch.Tensor] = []
        self._params: List[torch.Tensor] = []
        self._snapshot: Dict[Tuple, torch.Tensor] = {}

    def before_train(self) -> None:
        self._params, modules = trained_modules(self.trainer.model)
        self._buffers = [b for m in modules if is_rank_local_norm(m) for b in norm_buffers_of(m)]

    def _groups(self) -> Dict[Tuple, List[torch.Tensor]]:
        groups: Dict[Tuple, List[torch.Tensor]] = {}
        for b in self._buffers:
            groups.setdefault((b.device, b.dtype), []).append(b)
        return groups

    @torch.no_grad()
    def before_step(self) -> None:
        self._snapshot = {key: _flatten_dense_tensors(group) for key, group in self._groups().items()}

    def _not_finite(self, flats: List[torch.Tensor]) -> torch.Tensor:
        """0-d float tensor: 1 when a trained parameter or a BN statistic of this rank is inf/NaN (no host sync)."""
        checks = [torch.isfinite(f).all() for f in flats]
        by_device: Dict[torch.device, List[torch.Tensor]] = {}
        for p in self._params:
            by_device.setdefault(p.device, []).append(p.detach())
        for tensors in by_device.values():
            checks.append(torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all())
        device = flats[0].device if flats else (self._params[0].device if self._params else torch.device("cpu"))
        if not checks:
            return torch.zeros((), device=device)
        return (~torch.stack([c.to(device) for c in checks]).all()).float()

    @torch.no_grad()
    def after_step(self) -> None:
        groups = self._groups()
        flats = [_flatten_dense_tensors(g) for g in groups.values()]
        flag = self._not_finite(flats)
        world = _world()
        if world > 1:
            if flats and flats[0].is_floating_point():  # the flag travels with the first group's statistics
                flats[0] = torch.cat([flats[0], flag.to(flats[0].dtype).reshape(1)])
                for f in flats:
                    dist.all_reduce(f)
                flag, flats[0] = flats[0][-1], flats[0][:-1]
            else:
                flag = flag.reshape(1)
                dist.all_reduce(flag)
                for f in flats:
                    dist.all_reduce(f)
        bad = bool(flag.item() != 0)  # the same on every rank (the summed flag)
        self.trainer.nonfinite_step = bad
        if bad:
            for (key, group) in groups.items():
                if key in self._snapshot:
                    for t, v in zip(group, _unflatten_dense_tensors(self._snapshot[key], group)):
                        t.copy_(v)
            self.skipped += 1
            self.trainer.storage.put_scalar("nonfinite_steps_skipped", self.skipped, smoothing_hint=False)
            logger.warning(f"iteration {self.trainer.iter}: a trained parameter or BatchNorm statistic is inf/NaN on "
                           "some rank (an fp16 overflow?): BatchNorm statistics restored, no average, no EMA update")
            return
        if world > 1:
            for group, flat in zip(groups.values(), flats):
                flat /= world
                for t, avg in zip(group, _unflatten_dense_tensors(flat, group)):
                    t.copy_(avg)
