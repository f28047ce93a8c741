"""EMA teacher: decay schedule and one fused update against the formula, element by element."""
import copy

import pytest
import torch
from torch import nn

from mmt_psm.core.ema import copy_student_to_teacher_, ema_decay, ema_update_


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _trained_pair():
    torch.manual_seed(0)
    student = _net()
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    # Make student params and BN running stats differ from the teacher's.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    for _ in range(3):
        student(torch.randn(2, 3, 8, 8))
    return teacher, student


def test_decay_schedule():
    assert ema_decay(0, 0.99) == 0.0
    assert ema_decay(1, 0.99) == pytest.approx(0.5)
    assert ema_decay(10, 0.99) == pytest.approx(1 - 1 / 11)
    assert ema_decay(1000, 0.99) == pytest.approx(0.99)
    assert ema_decay(1000, 0.9999) == pytest.approx(1 - 1 / 1001)


def test_one_step_matches_formula():
    teacher, student = _trained_pair()
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    stud = {k: v.clone() for k, v in student.state_dict().items()}
    d = 0.9
    ema_update_(teacher, student, d)
    after = teacher.state_dict()
    checked = 0
    for k, v in after.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, d * before_t[k] + (1 - d) * stud[k], rtol=1e-6, atol=1e-7)
            checked += 1
        else:  # num_batches_tracked is copied
            assert torch.equal(v, stud[k])
    assert checked == 8  # 2 conv weights + 2 biases + BN weight/bias + running_mean/var
    assert stud["1.num_batches_tracked"].item() == 3
    # Student untouched.
    for k, v in student.state_dict().items():
        assert torch.equal(v, stud[k])


def test_decay_zero_copies_and_copy_helper():
    teacher, student = _trained_pair()
    ema_update_(teacher, student, 0.0)
    for (k, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(t, s), k
    teacher2, student2 = _trained_pair()
    copy_student_to_teacher_(teacher2, student2)
    for t, s in zip(teacher2.state_dict().values(), student2.state_dict().values()):
        assert torch.equal(t, s)


def test_half_student_fp32_teacher_and_wrapped_student():
    teacher, student = _trained_pair()
    student_half = copy.deepcopy(student).half()
    before = teacher[0].weight.clone()
    ema_update_(teacher, nn.DataParallel(student_half), 0.5)  # wrappers are stripped
    assert teacher[0].weight.dtype == torch.float32
    expected = 0.5 * before + 0.5 * student_half[0].weight.float()
    torch.testing.assert_close(teacher[0].weight, expected)


def test_mismatched_modules_raise():
    with pytest.raises(KeyError):
        ema_update_(_net(), nn.Sequential(nn.Conv2d(3, 4, 3)), 0.5)
    with pytest.raises(ValueError):
        ema_update_(_net(), _net(), 1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_student_fp32_teacher():
    teacher, student = _trained_pair()
    teacher, student = teacher.cuda(), student.cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        student(torch.randn(2, 3, 8, 8, device="cuda")).float().sum().backward()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update_(teacher, student, 0.99)
    for k, v in teacher.state_dict().items():
        assert v.dtype == before[k].dtype and v.device.type == "cuda"
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.99 * before[k] + 0.01 * student.state_dict()[k])
