"""Evaluation that means what it says: COCO AP counts TEST.DETECTIONS_PER_IMAGE detections (not 100) on any
COCO data set, TEST.CELL_SCORE_THRESH, SEMI.EVAL_BOTH, and TEST.AUG (TTA) for the semi-supervised model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from common import tiny_cfg, tiny_synthetic
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

from mmt_psm.core import Trainer
from mmt_psm.instance.cell_evaluator import CellInstanceEvaluator
from mmt_psm.instance.coco_ap import supports_max_dets
from mmt_psm.instance.user_datasets import register_user_dataset


def _crowded(tmp_path, n=150, size=256):
    """One image with ``n`` separate 8x8 squares (RLE-free polygons), category id 3."""
    import cv2

    cv2.imwrite(str(tmp_path / "crowd.png"), np.full((size, size, 3), 200, np.uint8))
    anns, boxes = [], []
    for k in range(n):
        y, x = 16 * (k // 10) + 2, 16 * (k % 10) + 2
        poly = [x, y, x + 8, y, x + 8, y + 8, x, y + 8]
        anns.append({"id": k + 1, "image_id": 1, "category_id": 3, "segmentation": [poly],
                     "bbox": [x, y, 8, 8], "area": 64.0, "iscrowd": 0})
        boxes.append((x, y))
    data = {"images": [{"id": 1, "file_name": "crowd.png", "height": size, "width": size}],
            "annotations": anns, "categories": [{"id": 3, "name": "nucleus"}]}
    (tmp_path / "crowd.json").write_text(json.dumps(data))
    masks = torch.zeros((n, size, size), dtype=torch.bool)
    for k, (x, y) in enumerate(boxes):
        masks[k, y : y + 8, x : x + 8] = True
    inst = Instances((size, size), pred_boxes=Boxes(torch.tensor([[x, y, x + 8, y + 8] for x, y in boxes],
                                                                  dtype=torch.float32)),
                     scores=torch.linspace(0.99, 0.5, n), pred_classes=torch.zeros(n, dtype=torch.long),
                     pred_masks=masks)
    return register_user_dataset(f"crowd_{n}:{tmp_path / 'crowd.json'}:{tmp_path}"), inst


@pytest.mark.skipif(not supports_max_dets(), reason="this Detectron2's COCOEvaluator lacks max_dets_per_image")
def test_coco_ap_counts_detections_per_image_on_a_user_coco_set(tmp_path):
    name, inst = _crowded(tmp_path)
    for max_dets, expected_ap in ((200, 100.0), (100, 100.0 * 100 / 150)):
        cfg = tiny_cfg(str(tmp_path / f"out{max_dets}"))
        cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 1, "TEST.DETECTIONS_PER_IMAGE", max_dets])
        evaluators = Trainer.build_evaluator(cfg, name)._evaluators
        coco = [e for e in evaluators if isinstance(e, COCOEvaluator)]
        assert len(coco) == 1 and coco[0]._max_dets_per_image == [1, 10, max_dets]  # a "coco"-type user set
        coco[0].reset()
        coco[0].process([{"image_id": 1}], [{"instances": inst}])
        res = coco[0].evaluate()
        # 150 perfect detections: all count with 200 (AP 100); with 100 only 2/3 of the objects are found
        assert res["segm"]["AP"] == pytest.approx(expected_ap, abs=0.5), max_dets
        assert res["bbox"]["AP"] == pytest.approx(expected_ap, abs=0.5), max_dets


def test_cell_score_thresh_is_a_config_key(tmp_path):
    tiny_synthetic(str(tmp_path), prefix="evcfg", n_train=1, n_test=1, n_unlabeled=1)
    cfg = tiny_cfg(str(tmp_path / "out"), "evcfg")
    cfg.TEST.CELL_SCORE_THRESH = 0.3
    cell = [e for e in Trainer.build_evaluator(cfg, "evcfg_test")._evaluators
            if isinstance(e, CellInstanceEvaluator)]
    assert len(cell) == 1 and cell[0]._score_thresh == 0.3


@pytest.fixture(scope="module")
def semi(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("evsemi"))
    tiny_synthetic(root, prefix="evsemi", n_train=1, n_test=1, n_unlabeled=1)
    cfg = tiny_cfg(root + "/out", "evsemi", "MMTPSMRCNN")
    cfg.merge_from_list(["DATASETS.TEST", ("evsemi_test",), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                         "TEST.DETECTIONS_PER_IMAGE", 10, "TEST.CELL_SCORE_THRESH", 0.0])
    torch.manual_seed(0)
    return cfg, Trainer.build_model(cfg)


@pytest.mark.parametrize("both", [True, False])
def test_eval_both_switch(semi, both):
    cfg, model = semi
    cfg = cfg.clone()
    cfg.SEMI.EVAL_BOTH = both
    res = Trainer.test(cfg, model)
    assert {"bbox", "segm", "cell"} <= set(res)
    assert ("segm_student" in res) == both and ("cell_student" in res) == both


def test_tta_on_the_semi_supervised_model(semi):
    cfg, model = semi
    cfg = cfg.clone()
    cfg.merge_from_list(["TEST.AUG.ENABLED", True, "TEST.AUG.MIN_SIZES", (96, 128), "TEST.AUG.MAX_SIZE", 128,
                         "TEST.AUG.FLIP", True])
    model.train()
    res = Trainer.test_with_TTA(cfg, model)
    assert {"bbox_TTA", "segm_TTA", "cell_TTA"} == set(res)
    assert 0.0 <= res["segm_TTA"]["AP"] <= 100.0
    # the teacher stays in eval mode, the student in training mode (inference_context restores modes)
    assert model.student.training and not model.teacher.training


def test_tta_on_a_model_without_a_detector_fails_clearly(semi):
    cfg, _ = semi
    with pytest.raises(ValueError, match="TEST.AUG needs a GeneralizedRCNN detector.*set TEST.AUG.ENABLED False"):
        Trainer.test_with_TTA(cfg, torch.nn.Linear(1, 1))
