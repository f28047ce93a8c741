"""What keeps every rank one run, step after step: a non-finite loss on any rank stops every rank.

- :func:`check_losses_finite` / :func:`install_finite_loss_check`: Detectron2 checks the losses on rank 0 only
  (``SimpleTrainer.write_metrics``), so the other ranks went on into the next collective and hung. Here, after the
  backward pass (whose gradient all-reduce every rank has reached) and before the optimizer step, each rank sums
  its count of non-finite loss terms in one all-reduce of one number; when it is not zero every rank gathers the
  offending terms and raises the same ``FloatingPointError``, naming the iteration, the ranks and the terms.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
import torch.distributed as dist
from detectron2.utils import comm

__all__ = ["check_losses_finite", "install_finite_loss_check"]

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
    mine = {k: float(v) for k, v in zip(loss_dict.keys(), values.tolist()) if not torch.isfinite(torch.tensor(v))}
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
