"""Step guards on one process: a non-finite loss raises naming the terms and the iteration; a step that leaves a
trained BN statistic or parameter inf/NaN (an fp16 overflow the GradScaler skipped) is undone for the BN statistics
and kept from the EMA teacher (a burn-in copy due then happens after the next finite step). The 2-process
behaviour (every rank stops; BN statistics averaged for every model) is tested in test_ddp_guards.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from detectron2.utils.events import EventStorage
from torch import nn

from mmt_psm.core.ema import EMATeacherHook
from mmt_psm.core.step_guards import NormStatisticsHook, check_losses_finite, trained_modules


def test_non_finite_loss_names_terms_and_iteration():
    check_losses_finite({"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(2.0)}, 3)
    with pytest.raises(FloatingPointError, match=r"iteration=7 \(rank 0: \{'loss_b': nan\}\)"):
        check_losses_finite({"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(float("nan"))}, 7)
    with pytest.raises(FloatingPointError, match="'loss_a': inf"):
        check_losses_finite({"loss_a": torch.tensor(float("inf"), dtype=torch.float16)}, 0)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
        self.teacher = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))

    def teacher_student_pairs(self):
        return [(self.teacher, self.student)]


def test_trained_modules_leave_the_teacher_out():
    model = Toy()
    params, modules = trained_modules(model)
    assert {id(p) for p in params} == {id(p) for p in model.student.parameters()}
    assert not {id(m) for m in model.teacher.modules()} & {id(m) for m in modules}


def _run(hooks, model, it, storage, step):
    trainer = SimpleNamespace(iter=it, model=model, storage=storage)
    for h in hooks:
        h.trainer = trainer
    storage.iter = it
    for h in hooks:
        h.before_step()
    step()
    for h in hooks:
        h.after_step()
    return trainer


def test_non_finite_step_restores_bn_statistics_and_skips_the_teacher():
    torch.manual_seed(0)
    model = Toy().train()
    guard = NormStatisticsHook()
    ema = EMATeacherHook(decay=0.5, start_iter=0, burn_in_iters=2, copy_at_burn_in=True)
    guard.trainer = SimpleNamespace(model=model)
    guard.before_train()
    bn = model.student[1]
    x = torch.randn(4, 1, 3, 3)

    def good():
        model.student(x)

    def overflow():  # what an fp16 overflow does to the statistics (the GradScaler skips the weights' update)
        model.student(x)
        bn.running_var.fill_(float("inf"))

    with EventStorage() as storage:
        t = _run([guard, ema], model, 0, storage, good)
        assert t.nonfinite_step is False and "nonfinite_steps_skipped" not in storage.latest()
        before = (bn.running_mean.clone(), bn.running_var.clone(), model.teacher.state_dict())
        t = _run([guard, ema], model, 1, storage, overflow)  # the last burn-in iteration: a copy was due
        assert t.nonfinite_step is True and storage.latest()["nonfinite_steps_skipped"][0] == 1
        assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])  # undone
        after = model.teacher.state_dict()
        assert all(torch.equal(after[k], before[2][k]) for k in after)  # no EMA, no copy of a broken student
        t = _run([guard, ema], model, 2, storage, good)  # finite again: the pending copy happens
        assert t.nonfinite_step is False
        s, te = model.student.state_dict(), model.teacher.state_dict()
        assert all(torch.equal(s[k], te[k]) for k in s)
        with torch.no_grad():
            model.student[0].weight[0, 0, 0, 0] = float("nan")  # a non-finite parameter counts too
        _run([guard, ema], model, 3, storage, good)
        assert storage.latest()["nonfinite_steps_skipped"][0] == 2 and torch.isfinite(model.teacher[0].weight).all()
