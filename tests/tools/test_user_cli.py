"""A new user's run, command line only: their own 1-class COCO file (category id 7, RGB, polygons) and a
folder of unlabeled images, MMT-PSM for a few CPU iterations, evaluated with COCO AP and the cell metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from common import REPO
from user_data import CATEGORY_ID, write_user_dataset

# tests/common.py's tiny_cfg, as command-line overrides of the quickstart MMT-PSM config
TINY = [
    "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "400",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "MODEL.MMT_PSM.PROPOSAL_BATCH_SIZE", "64",
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128", "MODEL.MMT_PSM.MGD_ADAPTOR_DIM", "32",
    "SEMI.IMS_PER_BATCH_LABELED", "1", "SEMI.IMS_PER_BATCH_UNLABELED", "1", "SEMI.BURN_IN_ITERS", "2",
    "SEMI.EMA_START_ITER", "1", "SEMI.RAMP_UP_ITERS", "0", "SEMI.RAMP_DOWN_ITERS", "0", "SEMI.UNSUP_WEIGHT", "1.0",
    "SEMI.VIS_PERIOD", "0", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "0", "SOLVER.MAX_ITER", "4",
    "SOLVER.STEPS", "()", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.CELL_SCORE_THRESH", "0.0",
]


def _train_net(paths, out, *extra):
    register = (f'("cells_train:{paths["train"]}:{paths["image_root"]}", '
                f'"cells_test:{paths["test"]}:{paths["image_root"]}", "cells_unl:{paths["unlabeled"]}")')
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
           os.path.join(REPO, "configs", "quickstart", "mmt_psm.yaml"), "DATASETS.REGISTER", register,
           "DATASETS.TRAIN", '("cells_train",)', "DATASETS.TEST", '("cells_test",)',
           "DATASETS.TRAIN_UNLABELED", '("cells_unl",)', *TINY, "OUTPUT_DIR", out, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)


def test_own_coco_data_and_image_folder_train_mmt_psm_from_the_command_line(tmp_path):
    paths = write_user_dataset(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    r = _train_net(paths, out, "MODEL.ROI_HEADS.NUM_CLASSES", "1")
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    final = {k: v for rec in records for k, v in rec.items()}
    # COCO AP of the user's test set for the teacher and (suffixed) the student (Detectron2 lists per-class AP
    # only for 2+ classes)
    for key in ("segm/AP", "segm/AP50", "bbox/AP", "segm_student/AP"):
        assert key in final and 0.0 <= final[key] <= 100.0, sorted(final)
    # cell metrics under the user's class name: both AJIs, named for what they are
    for key in ("cell/AJI", "cell/AJI-cell", "cell/AJI_pooled", "cell/F1", "cell/Dice", "cell_student/AJI"):
        assert key in final and 0.0 <= final[key] <= 100.0, key
    assert "copypaste: AJI,F1,Dice,IoU,AJI_pooled" in log
    # the unsupervised path ran after burn-in, its raw losses logged beside the weighted ones
    raw = [rec for rec in records if "mmt_psm/loss_psm_raw" in rec]
    assert raw and all(rec["iteration"] >= 2 for rec in raw) and "loss_psm" in raw[-1]
    assert "mmt_psm/loss_mgd_raw" in raw[-1]
    # predictions are written with the user's category id (7), not the contiguous 0
    with open(os.path.join(out, "inference", "cells_test", "coco_instances_results.json")) as f:
        results = json.load(f)
    assert results and {d["category_id"] for d in results} == {CATEGORY_ID}
    assert os.path.exists(os.path.join(out, "model_final.pth"))


def test_num_classes_mismatch_fails_before_training(tmp_path):
    paths = write_user_dataset(str(tmp_path / "data"), n_train=1, n_test=1, n_unlabeled=1)
    out = str(tmp_path / "run")
    r = _train_net(paths, out)  # the quickstart config says NUM_CLASSES 2
    assert r.returncode != 0
    assert "MODEL.ROI_HEADS.NUM_CLASSES is 2 but data set 'cells_train' has 1 classes ['cell']" in r.stderr
    assert not os.path.exists(os.path.join(out, "metrics.json"))
