"""tools/compare_checkpoints.py: differences of two state dicts against a hand computation."""
import os
import runpy

import pytest
import torch
from common import REPO

TOOL = runpy.run_path(os.path.join(REPO, "tools", "compare_checkpoints.py"))


def test_differences_by_hand_and_only_under_the_prefix(tmp_path, capsys):
    a = {"student.w": torch.tensor([3.0, 4.0]), "student.b": torch.tensor([1.0]), "teacher.w": torch.tensor([9.0]),
         "student.n": torch.tensor([2])}  # an integer buffer is not compared
    b = {"student.w": torch.tensor([3.0, 4.5]), "student.b": torch.tensor([1.0]), "teacher.w": torch.tensor([0.0]),
         "student.n": torch.tensor([5])}
    res = TOOL["compare"](a, b, "student.")
    # ||(0, -0.5)|| / ||(3, 4)|| = 0.1; the bias is identical
    assert res == {"tensors": 2, "identical": 1, "max_abs": pytest.approx(0.5), "mean_rel": pytest.approx(0.05),
                   "max_rel": pytest.approx(0.1)}
    torch.save({"model": a, "iteration": 3}, tmp_path / "a.pth")
    torch.save(b, tmp_path / "b.pth")  # a bare state dict
    assert TOOL["main"]([str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "--prefix", "teacher."]) == 0
    assert '"max_abs": 9.0' in capsys.readouterr().out
    with pytest.raises(ValueError, match="no floating-point tensor named 'head....' in a and 'head....' in b"):
        TOOL["compare"](a, b, "head.")
    # a plain model's names against a teacher-student model's student
    plain = {"w": torch.tensor([3.0, 4.5]), "b": torch.tensor([2.0])}
    res = TOOL["compare"](a, plain, "student.", "")
    assert (res["tensors"], res["identical"], res["max_abs"]) == (2, 0, pytest.approx(1.0))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="bad.pth: not a readable checkpoint"):
        TOOL["load_weights"](str(tmp_path / "bad.pth"))
