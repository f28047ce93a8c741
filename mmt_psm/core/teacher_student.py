"""What every teacher-student meta-architecture of this project shares (MMT-PSM and the semantic siblings).

- ``evaluate_with("teacher"|"student")``: which model answers at inference (``SEMI.EVAL_WITH``; the Trainer
  evaluates both, the other one suffixed);
- an EMA teacher (``EMA_TEACHER = True``) stays in eval mode and out of the optimizer; the EMA itself is done by
  ``EMATeacherHook`` over ``teacher_student_pairs()`` (``mmt_psm.core.ema``);
- ``loss_weight(iter)``: the unsupervised weight schedule of ``mmt_psm.core.ramps``;
- a plain single-model checkpoint given as ``MODEL.WEIGHTS`` loads into both teacher and student.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

from torch import nn

from mmt_psm.core.ramps import unsup_weight

__all__ = ["TeacherStudentMixin", "ramp_config"]


def ramp_config(cfg) -> dict:
    """The ramp / schedule arguments every teacher-student model takes, from ``SEMI`` and ``SOLVER.MAX_ITER``."""
    s = cfg.SEMI
    return {"burn_in": s.BURN_IN_ITERS, "ramp_up": s.RAMP_UP_ITERS, "ramp_down": s.RAMP_DOWN_ITERS,
            "max_iter": cfg.SOLVER.MAX_ITER, "unsup_weight_base": s.UNSUP_WEIGHT, "eval_with": s.EVAL_WITH}


class TeacherStudentMixin:
    """Mixin for ``nn.Module`` meta-architectures with ``self.teacher`` and ``self.student`` sub-models.

    The subclass sets ``self._eval_with`` and the ramp attributes ``burn_in, ramp_up, ramp_down, max_iter,
    unsup_weight_base`` in its ``__init__`` and calls ``self._init_teacher_student()`` after building both.
    """

    EMA_TEACHER = True  # False: the "teacher" is trained by gradients (e.g. the top head of mixed supervision)

    def _init_teacher_student(self, eval_with: str) -> None:
        if eval_with not in ("teacher", "student"):
            raise ValueError(f"SEMI.EVAL_WITH must be 'teacher' or 'student', got {eval_with!r}")
        self._eval_with = eval_with
        if self.EMA_TEACHER:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self.teacher.eval()
        self._register_load_state_dict_pre_hook(self._load_plain_model)

    def teacher_student_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """The (EMA target, source) module pairs the EMA hook updates (none without an EMA teacher)."""
        return [(self.teacher, self.student)] if self.EMA_TEACHER else []

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        if self.EMA_TEACHER:
            self.teacher.eval()
        return self

    @contextlib.contextmanager
    def evaluate_with(self, which: str) -> Iterator[None]:
        """Run inference with the ``"teacher"`` or the ``"student"`` inside the block."""
        if which not in ("teacher", "student"):
            raise ValueError(f"evaluate_with: 'teacher' or 'student', got {which!r}")
        old, self._eval_with = self._eval_with, which
        try:
            yield
        finally:
            self._eval_with = old

    def inference_model(self) -> nn.Module:
        """The sub-model that answers at inference now."""
        return self.teacher if self._eval_with == "teacher" else self.student

    def loss_weight(self, iteration: int) -> float:
        """Unsupervised weight w(t): 0 in burn-in, Gaussian ramps (``mmt_psm.core.ramps.unsup_weight``)."""
        return unsup_weight(iteration, self.burn_in, self.ramp_up, self.ramp_down, self.max_iter,
                            self.unsup_weight_base)

    @staticmethod
    def _load_plain_model(state_dict, prefix, *args) -> None:
        """A plain single-model state dict (no ``student.`` keys) is loaded into both teacher and student."""
        if any(k.startswith(prefix + "student.") or k.startswith(prefix + "teacher.") for k in state_dict):
            return
        for key in [k for k in state_dict if k.startswith(prefix)]:
            value = state_dict.pop(key)
            rest = key[len(prefix):]
            state_dict[f"{prefix}student.{rest}"] = value
            state_dict[f"{prefix}teacher.{rest}"] = value
