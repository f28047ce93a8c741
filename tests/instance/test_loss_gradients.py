"""Per-loss gradient diagnostics (mmt_psm/instance/loss_gradients.py, tools/loss_gradients.py)."""
import json
import math
import os
import runpy

import pytest
import torch
from common import REPO

from mmt_psm.instance.loss_gradients import loss_gradient_stats


def _toy():
    a, b = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([3.0]))
    losses = {
        "loss_cls": 3 * a[0] + b[0] ** 2,  # d/da = (3, 0), d/db = 6
        "loss_mask": 4 * a[1],  # d/da = (0, 4)
        "loss_mgd": -a[0] + 2 * a[1],  # d/da = (-1, 2)
    }
    return a, b, losses


def test_norms_and_cosines_match_hand_computation():
    a, b, losses = _toy()
    s = loss_gradient_stats(losses, {"A": [a], "B": [b]})
    # supervised gradient on A = (3, 4): norm 5; loss_mgd's = (-1, 2): norm sqrt 5
    assert s["supervised"]["A"]["norm"] == pytest.approx(5.0)
    assert s["supervised"]["A"]["cos_supervised"] == pytest.approx(1.0)
    assert s["loss_mgd"]["A"]["norm"] == pytest.approx(math.sqrt(5))
    assert s["loss_mgd"]["A"]["cos_supervised"] == pytest.approx(5 / (5 * math.sqrt(5)))
    assert s["loss_mgd"]["A"]["cos_loss_mask"] == pytest.approx(8 / (4 * math.sqrt(5)))
    assert s["unsupervised"]["A"] == s["loss_mgd"]["A"]
    assert s["loss_cls"]["B"]["norm"] == pytest.approx(6.0)
    assert s["loss_mgd"]["B"]["norm"] == 0.0 and math.isnan(s["loss_mgd"]["B"]["cos_supervised"])
    assert a.grad is None and b.grad is None  # nothing accumulated into .grad


def test_no_supervised_loss_is_an_error():
    _, _, losses = _toy()
    with pytest.raises(ValueError, match="no supervised loss"):
        loss_gradient_stats({"loss_mgd": losses["loss_mgd"]}, {})


def test_tool_on_a_trained_checkpoint(trained_mmt_psm, tmp_path):
    """The tool on a 6-iteration MMT-PSM run's checkpoint: the feature loss reaches the backbone and the adaptors
    but not the box/mask heads; the semantic loss reaches the heads but not the adaptors; the summed unsupervised
    term is each one's alone where only one reaches; the JSON holds the returned numbers."""
    tool = runpy.run_path(os.path.join(REPO, "tools", "loss_gradients.py"))
    weights = os.path.join(trained_mmt_psm.output_dir, "model_final.pth")
    out = str(tmp_path / "g.json")
    r = tool["main"](["--config-file", os.path.join(trained_mmt_psm.output_dir, "config.yaml"), "--weights", weights,
                      "--batches", "1", "--iteration", "4", "--threads", "1", "--json", out])
    assert r["unsup_weight"] == pytest.approx(1.0) and os.path.isfile(out)
    s = r["summary"]
    assert s["loss_mgd"]["backbone"]["norm_median"] > 0 and s["loss_mgd"]["adaptors"]["norm_median"] > 0
    assert s["loss_mgd"]["roi_heads"]["norm_median"] == 0.0
    assert s["loss_psm"]["adaptors"]["norm_median"] == 0.0
    assert s["supervised"]["backbone"]["cos_supervised_mean"] == pytest.approx(1.0)
    unsup, psm, mgd = s["unsupervised"], s["loss_psm"], s["loss_mgd"]
    assert unsup["adaptors"]["norm_median"] == pytest.approx(mgd["adaptors"]["norm_median"])
    assert unsup["roi_heads"]["norm_median"] == pytest.approx(psm["roi_heads"]["norm_median"])
    assert unsup["backbone"]["norm_median"] <= psm["backbone"]["norm_median"] + mgd["backbone"]["norm_median"] + 1e-9
    assert "| loss_mgd |" in tool["table"](r) and "cos mask backbone" in tool["table"](r)
    with open(out) as f:
        saved = json.load(f)
    assert saved["summary"]["loss_mgd"]["backbone"]["norm_median"] == pytest.approx(mgd["backbone"]["norm_median"])
