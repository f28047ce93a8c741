"""EMATeacherHook: the schedule (start iteration, decay warm-up, copy at the end of burn-in) on a toy model."""
from types import SimpleNamespace

import torch
from detectron2.utils.events import EventStorage
from torch import nn

from mmt_psm.core.ema import EMATeacherHook


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.student, self.teacher = nn.Linear(2, 2), nn.Linear(2, 2)

    def teacher_student_pairs(self):
        return [(self.teacher, self.student)]


def _step(hook, model, it, storage):
    hook.trainer = SimpleNamespace(iter=it, model=model, storage=storage)
    storage.iter = it
    hook.after_step()


def test_ema_hook_schedule():
    model = Toy()
    hook = EMATeacherHook(decay=0.9, start_iter=3, burn_in_iters=6, copy_at_burn_in=True)
    with EventStorage() as storage:
        t0 = model.teacher.weight.detach().clone()
        _step(hook, model, 2, storage)  # before EMA_START_ITER: untouched, nothing logged
        assert torch.equal(model.teacher.weight, t0) and "ema_decay" not in storage.latest()
        with torch.no_grad():
            model.student.weight.fill_(1.0)
        _step(hook, model, 3, storage)  # t = 0: decay min(1 - 1/1, 0.9) = 0 -> a copy
        assert torch.equal(model.teacher.weight, model.student.weight)
        assert storage.latest()["ema_decay"][0] == 0.0
        with torch.no_grad():
            model.student.weight.fill_(3.0)
        _step(hook, model, 4, storage)  # t = 1: decay 0.5 -> 0.5 * 1 + 0.5 * 3
        assert torch.allclose(model.teacher.weight, torch.full((2, 2), 2.0))
        with torch.no_grad():
            model.student.weight.fill_(7.0)
        _step(hook, model, 5, storage)  # last burn-in iteration: the teacher becomes the student
        assert torch.equal(model.teacher.weight, model.student.weight)
        _step(hook, model, 100, storage)  # late: decay capped at 0.9
        assert storage.latest()["ema_decay"][0] == 0.9


def test_rank_local_norm_buffers_are_plain_bn_statistics_and_averaging_is_a_no_op_on_one_process():
    from detectron2.layers import NaiveSyncBatchNorm

    from mmt_psm.core.ema import average_across_ranks_, rank_local_norm_buffers

    bn, sync, naive = nn.BatchNorm2d(3), nn.SyncBatchNorm(4), NaiveSyncBatchNorm(5)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bn, sync, naive, nn.GroupNorm(1, 3))
    bufs = rank_local_norm_buffers(model)
    assert len(bufs) == 2 and bufs[0] is bn.running_mean and bufs[1] is bn.running_var  # not the SyncBN ones
    bn.running_mean.fill_(2.0)
    average_across_ranks_(bufs)  # no process group: untouched
    assert torch.equal(bn.running_mean, torch.full((3,), 2.0))
