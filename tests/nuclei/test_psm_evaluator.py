"""The ``nuclei_instances`` evaluator as train_net builds it: perfect logits score 1, an empty prediction 0."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
from psm_common import he_tile
from test_psm_model import tiny_psm_cfg

from mmt_psm.core.trainer import Trainer
from mmt_psm.nuclei.datasets import register_psm_labels
from mmt_psm.nuclei.evaluator import NucleiInstanceEvaluator
from mmt_psm.nuclei.tile_io import write_index


def test_trainer_builds_nuclei_evaluator_and_scores(tmp_path):
    img, inst = he_tile((64, 64), ((16, 16), (16, 44), (46, 30)), radius=7)
    cv2.imwrite(str(tmp_path / "t.png"), img[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "t_inst.png"), inst)
    write_index(str(tmp_path), [{"stem": "t", "file_name": str(tmp_path / "t.png"), "height": 64, "width": 64,
                                 "instances": "t_inst.png"}])
    register_psm_labels("psm_eval_test", str(tmp_path))
    cfg = tiny_psm_cfg()
    cfg.PSM.PAPER_CROP = 32
    ev = Trainer.build_evaluator(cfg, "psm_eval_test", output_folder=str(tmp_path / "eval"))
    assert isinstance(ev, NucleiInstanceEvaluator)
    d = {"file_name": str(tmp_path / "t.png"), "instance_file_name": str(tmp_path / "t_inst.png")}
    fg = torch.from_numpy((inst > 0).astype(np.float32))
    ev.reset()
    ev.process([d], [{"sem_seg": torch.stack([-5 * fg, 5 * fg])}])
    res = ev.evaluate()["nuclei"]
    assert res["AJI"] == pytest.approx(1.0) and res["F1"] == 1.0 and res["Dice"] == 1.0
    assert res["AP"] == pytest.approx(100.0) and "AJI_paper" in res
    assert os.path.isfile(tmp_path / "eval" / "nuclei_metrics.json")
    ev.reset()
    ev.process([d], [{"sem_seg": torch.stack([torch.ones_like(fg), torch.zeros_like(fg)])}])
    res = ev.evaluate()["nuclei"]
    assert res["AJI"] == 0.0 and res["F1"] == 0.0 and res["AP"] == 0.0
