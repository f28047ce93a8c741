"""CellInstanceEvaluator on a tiny registered COCO data set: perfect predictions and a hand-computed case."""
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.structures import Instances  # noqa: E402

from mmt_psm.instance.cell_evaluator import CellInstanceEvaluator  # noqa: E402
from mmt_psm.instance.coco_io import (  # noqa: E402
    annotation_to_mask,  # noqa: E402
    image_record,
    masks_to_annotations,
    write_coco_json,
)


def box(r0, r1, c0, c1, shape=(4, 4)):
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# Image 1 (4x4). Cytoplasm GT: A = rows 0-1 cols 0-1, B = rows 0-1 cols 1-2 (overlap col 1). Nucleus GT: N.
GT_A, GT_B, GT_N = box(0, 2, 0, 2), box(0, 2, 1, 3), box(2, 4, 2, 4)
# Image 2 (4x4). Cytoplasm GT: C = row 3. No nucleus.
GT_C = box(3, 4, 0, 4)
EMPTY = np.zeros((0, 4, 4), dtype=bool)
GT = {1: (np.stack([GT_A, GT_B]), GT_N[None]), 2: (GT_C[None], EMPTY)}


def register_tiny(tmp_path, name):
    """COCO file (dataset category ids 1 = cytoplasm, 2 = nucleus) registered the Detectron2 way."""
    images, anns = [], []
    for image_id, (cyto, nuc) in GT.items():
        images.append(image_record(image_id, f"{image_id}.png", 4, 4))
        anns += masks_to_annotations(cyto, 1, image_id, len(anns) + 1)
        anns += masks_to_annotations(nuc, 2, image_id, len(anns) + 1)
    json_file = str(tmp_path / "tiny.json")
    write_coco_json(json_file, images, anns)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_file, str(tmp_path))
    return name


def instances(masks, classes, scores):
    inst = Instances((4, 4))
    inst.pred_masks = torch.as_tensor(np.asarray(masks, dtype=bool).reshape(-1, 4, 4))
    inst.pred_classes = torch.as_tensor(classes, dtype=torch.int64)
    inst.scores = torch.as_tensor(scores, dtype=torch.float32)
    return inst


def run(evaluator, preds):
    evaluator.reset()
    for image_id, inst in preds.items():
        evaluator.process([{"image_id": image_id}], [{"instances": inst}])
    return evaluator.evaluate()


def test_perfect_predictions_score_100(tmp_path):
    name = register_tiny(tmp_path, "cell_eval_tiny_perfect")
    preds = {}
    for image_id, (cyto, nuc) in GT.items():
        masks = np.concatenate([cyto, nuc])
        preds[image_id] = instances(masks, [0] * len(cyto) + [1] * len(nuc), [0.9] * len(masks))
    res = run(CellInstanceEvaluator(name, distributed=False), preds)["cell"]
    metrics = ("AJI", "F1", "Dice", "IoU", "AJI_pooled")
    assert set(res) == {f"{m}-{c}" for m in metrics for c in ("cytoplasm", "nucleus")} | set(metrics)
    for key, value in res.items():
        # Dice/IoU of image 2's nucleus: no GT and no prediction -> 1.0 by convention, so still 100.
        assert value == pytest.approx(100.0), key


def test_imperfect_case_matches_hand_figures(tmp_path):
    name = register_tiny(tmp_path, "cell_eval_tiny_imperfect")
    p1, p2, p3 = box(0, 2, 0, 2), box(0, 2, 1, 4), box(3, 4, 0, 4)
    low = box(0, 4, 0, 4)  # score 0.3 < 0.5: must be ignored
    preds = {
        1: instances([p1, p2, p3, GT_N, low], [0, 0, 0, 1, 0], [0.9, 0.8, 0.7, 0.95, 0.3]),
        2: instances([box(0, 1, 0, 1)], [1], [0.6]),  # a 1-px false nucleus; cytoplasm C missed
    }
    out_dir = str(tmp_path / "out")
    res = run(CellInstanceEvaluator(name, output_dir=out_dir, distributed=False), preds)["cell"]
    # Cytoplasm. Image 1: A->P1 (C 4, U 4), B->P2 (C 4, U 6), P3 unused (U 4): C 8, U 14; tp 2, fp 1, fn 0;
    #   Dice 2*6/(6+12) = 2/3, IoU 6/12. Image 2: C missed: C 0, U 4; tp 0, fp 0, fn 1; Dice 0, IoU 0.
    #   AJI = mean(8/14, 0/4) = 2/7; pooled AJI = 8/18; F1 = 2*2/(2*2+1+1) = 2/3; Dice = mean(2/3, 0) = 1/3;
    #   IoU = mean(1/2, 0) = 1/4.
    assert res["AJI-cytoplasm"] == pytest.approx(100 * 2 / 7)
    assert res["AJI_pooled-cytoplasm"] == pytest.approx(100 * 8 / 18)
    assert res["F1-cytoplasm"] == pytest.approx(100 * 2 / 3)
    assert res["Dice-cytoplasm"] == pytest.approx(100 / 3)
    assert res["IoU-cytoplasm"] == pytest.approx(25.0)
    # Nucleus. Image 1 perfect: C 4, U 4; tp 1; Dice 1, IoU 1. Image 2: no GT, 1 px predicted: U 1; fp 1;
    #   Dice 0, IoU 0.  AJI = mean(4/4, 0/1) = 1/2; pooled AJI = 4/5; F1 = 2/(2+1) = 2/3;
    #   Dice = IoU = mean(1, 0) = 1/2.
    assert res["AJI-nucleus"] == pytest.approx(50.0)
    assert res["AJI_pooled-nucleus"] == pytest.approx(80.0)
    assert res["F1-nucleus"] == pytest.approx(100 * 2 / 3)
    assert res["Dice-nucleus"] == pytest.approx(50.0)
    assert res["IoU-nucleus"] == pytest.approx(50.0)
    assert res["AJI"] == pytest.approx((100 * 2 / 7 + 50.0) / 2)
    assert res["AJI_pooled"] == pytest.approx((100 * 8 / 18 + 80.0) / 2)
    assert res["Dice"] == pytest.approx((100 / 3 + 50.0) / 2)
    with open(os.path.join(out_dir, "cell_metrics.json")) as f:
        per_image = json.load(f)
    assert [p["image_id"] for p in per_image] == [1, 2]
    assert per_image[0]["classes"]["cytoplasm"]["aji_u"] == 14


def test_no_predictions_processed_returns_empty(tmp_path):
    name = register_tiny(tmp_path, "cell_eval_tiny_empty")
    evaluator = CellInstanceEvaluator(name, distributed=False)
    evaluator.reset()
    assert evaluator.evaluate() == {}


def test_annotation_to_mask_rle_and_polygon():
    m = box(1, 3, 0, 2)
    rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    np.testing.assert_array_equal(annotation_to_mask(rle, 4, 4), m)
    poly = [[0.0, 0.0, 4.0, 0.0, 4.0, 2.0, 0.0, 2.0]]  # rows 0-1 in pixel-corner coordinates
    np.testing.assert_array_equal(annotation_to_mask(poly, 4, 4), box(0, 2, 0, 4))
