"""Checkpoints load in Detectron2's own DefaultPredictor, in a process that never imports mmt_psm."""
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from common import REPO, tiny_cfg, tiny_synthetic
from detectron2.engine import DefaultPredictor

from mmt_psm.core import Trainer

PREDICT = r"""
import json, sys
import cv2
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
cfg = get_cfg()
cfg.merge_from_file(sys.argv[1])
cfg.MODEL.DEVICE = "cpu"
out = DefaultPredictor(cfg)(cv2.imread(sys.argv[2]))["instances"]
assert "mmt_psm" not in sys.modules, "mmt_psm was imported"
print(json.dumps({"boxes": out.pred_boxes.tensor.tolist(), "scores": out.scores.tolist(),
                  "classes": out.pred_classes.tolist(), "mask_sum": int(out.pred_masks.sum())}))
"""


def _plain_predict(config: str, image: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", PREDICT, config, image], capture_output=True, text=True, env=env,
                       cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _export(run_dir: str, which: str = "teacher") -> str:
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_teacher.py"), run_dir, "--which", which],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return os.path.join(run_dir, f"config_{which}.yaml")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("exp"))
    tiny_synthetic(root, prefix="exp")
    return os.path.join(root, "images", "test_0.png")


def _check_export_reproduces_predictions(cfg, run_dir: str, image: str) -> None:
    """Export ``run_dir``'s reported model; plain Detectron2 (other process) and our model agree on ``image``."""
    plain = _plain_predict(_export(run_dir), image)
    # the same image through the project's model (the teacher for MMT-PSM) in this process
    cfg_full = cfg.clone()
    cfg_full.defrost()
    cfg_full.MODEL.WEIGHTS = os.path.join(run_dir, "model_final.pth")
    ours = DefaultPredictor(cfg_full)(cv2.imread(image))["instances"]
    assert len(ours) > 0 and len(plain["scores"]) == len(ours)
    np.testing.assert_allclose(plain["boxes"], ours.pred_boxes.tensor.numpy(), atol=1e-3)
    np.testing.assert_allclose(plain["scores"], ours.scores.numpy(), atol=1e-5)
    assert plain["classes"] == ours.pred_classes.tolist()
    assert plain["mask_sum"] == int(ours.pred_masks.sum())


def test_export_of_mmt_psm_is_the_teacher_and_reproduces_its_predictions(trained_mmt_psm, tmp_path):
    run_dir = str(tmp_path / "run")  # a copy: the shared run's directory stays as it was
    os.makedirs(run_dir)
    for name in ("model_final.pth", "config.yaml"):
        shutil.copy(os.path.join(trained_mmt_psm.output_dir, name), run_dir)
    with open(os.path.join(run_dir, "last_checkpoint"), "w") as f:
        f.write("model_final.pth")
    image = os.path.join(trained_mmt_psm.data_root, "images", "test_0.png")
    _check_export_reproduces_predictions(trained_mmt_psm.cfg, run_dir, image)
    exported = torch.load(os.path.join(run_dir, "model_teacher.pth"), weights_only=True)["model"]
    teacher = trained_mmt_psm.trainer.model.teacher.state_dict()
    assert exported.keys() == teacher.keys()
    assert all(torch.equal(exported[k], teacher[k]) for k in teacher)
    student = trained_mmt_psm.trainer.model.student.state_dict()
    assert any(not torch.equal(exported[k], student[k]) for k in teacher if k in student)


def test_export_of_a_supervised_run_reproduces_its_predictions(image, tmp_path):
    cfg = tiny_cfg(str(tmp_path / "run"), "exp", "GeneralizedRCNN")
    cfg.merge_from_list(["SOLVER.MAX_ITER", 4, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    Trainer(cfg).train()
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:  # what train_net's default_setup writes
        f.write(cfg.dump())
    _check_export_reproduces_predictions(cfg, cfg.OUTPUT_DIR, image)


def test_train_net_cli_checkpoint_loads_in_default_predictor(tmp_path):
    """tools/train_net.py end to end (train + evaluate), then export and plain Detectron2 inference."""
    tiny_synthetic(str(tmp_path / "synthetic"), prefix="cli", n_train=2, n_test=1, n_unlabeled=1)
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path))
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
           os.path.join(REPO, "configs", "quickstart", "supervised.yaml"), "SOLVER.MAX_ITER", "2",
           "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MIN_SIZE_TEST", "128", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
           "OUTPUT_DIR", out]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "copypaste: AJI,F1,Dice,IoU" in r.stderr + r.stdout  # COCO + cell evaluation ran
    assert os.path.exists(os.path.join(out, "model_final.pth"))
    plain = _plain_predict(_export(out, "teacher"), str(tmp_path / "synthetic" / "images" / "test_0.png"))
    assert len(plain["scores"]) > 0
