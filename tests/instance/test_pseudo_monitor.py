"""Pseudo-label monitor: matching by hand, ground truth mapped into the teacher's view, and a run whose losses are
identical with and without it."""
import os

import numpy as np
import pytest
import torch
from common import tiny_cfg, tiny_synthetic
from detectron2.data import transforms as T

from mmt_psm.core import Trainer
from mmt_psm.instance.datasets import register_cell_coco
from mmt_psm.instance.pseudo_label_monitor import gt_masks_in_view, match_counts
from mmt_psm.instance.views import ViewTransform


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_match_counts_by_hand():
    gt = np.stack([_box(10, 10, 0, 4, 0, 4), _box(10, 10, 6, 10, 6, 10)])
    pred = np.stack([_box(10, 10, 0, 4, 0, 3), _box(10, 10, 0, 2, 6, 8)])  # IoU 0.75 with gt 0; no match
    c = match_counts(gt, pred)
    assert c == {"tp": 1.0, "num_pred": 2.0, "num_gt": 2.0, "iou_sum": pytest.approx(0.75)}
    assert match_counts(gt[:0], pred)["tp"] == 0.0


def test_gt_mapped_through_crop_resize_and_flip():
    record = {"height": 20, "width": 40, "annotations": [
        {"bbox": [20, 4, 28, 12], "bbox_mode": 0, "category_id": 1,
         "segmentation": [[20, 4, 28, 4, 28, 12, 20, 12]]}]}
    source = T.TransformList([T.CropTransform(10, 0, 20, 20), T.ResizeTransform(20, 20, 40, 40)])
    view = {"source_transform": source, "base_transform": ViewTransform((40, 40), (40, 40), False),
            "teacher_transforms": [ViewTransform((40, 40), (40, 40), hflip=True)]}
    masks, classes = gt_masks_in_view(record, view)
    assert masks.shape == (1, 40, 40) and classes.tolist() == [1]
    ys, xs = np.nonzero(masks[0])
    # crop x 10..30 -> x 10..18 becomes 10..18; x2 resize -> 20..36 wide 16; flip over 40 -> 4..20
    assert (ys.min(), ys.max()) == (8, 23) and (xs.min(), xs.max()) == (4, 19)
    view["base_transform"] = ViewTransform((40, 40), (40, 40), True)  # base flip and view flip cancel
    masks, _ = gt_masks_in_view(record, view)
    assert (np.nonzero(masks[0])[1].min(), np.nonzero(masks[0])[1].max()) == (20, 35)


def test_objects_cropped_away_are_not_ground_truth_of_the_view():
    """A frame's cells outside the crop are not in the view the teacher saw: counting them (as the first version
    did) made recall on real 256 crops of 1024 frames look like 0.1 instead of 0.85."""
    inside = [[2, 2, 8, 2, 8, 8, 2, 8]]
    outside = [[30, 2, 38, 2, 38, 8, 30, 8]]
    record = {"height": 20, "width": 40, "annotations": [
        {"bbox": [2, 2, 8, 8], "bbox_mode": 0, "category_id": 0, "segmentation": inside},
        {"bbox": [30, 2, 38, 8], "bbox_mode": 0, "category_id": 1, "segmentation": outside}]}
    view = {"source_transform": T.TransformList([T.CropTransform(0, 0, 20, 20)]),
            "base_transform": ViewTransform((20, 20), (20, 20), False),
            "teacher_transforms": [ViewTransform((20, 20), (20, 20), False)]}
    masks, classes = gt_masks_in_view(record, view)
    assert masks.shape == (1, 20, 20) and classes.tolist() == [0]
    assert masks[0].sum() == 36


def test_monitor_never_changes_training(tmp_path):
    data = str(tmp_path / "data")
    tiny_synthetic(data, prefix="mon")
    register_cell_coco("mon_unl_gt_held", os.path.join(data, "train.json"), os.path.join(data, "images"), "",
                       strip_annotations=True)

    def run(monitor: bool):
        cfg = tiny_cfg(str(tmp_path / f"out{int(monitor)}"), "mon", "MMTPSMRCNN")
        cfg.merge_from_list(["DATASETS.TRAIN_UNLABELED", ("mon_unl_gt_held",), "SOLVER.MAX_ITER", 4,
                             "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "SOLVER.CHECKPOINT_PERIOD", 100])
        if monitor:
            cfg.merge_from_list(["DATASETS.UNLABELED_GT", ("mon_train",), "SEMI.PSEUDO_MONITOR_PERIOD", 1])
        torch.manual_seed(0)
        trainer = Trainer(cfg)
        trainer.train()
        return trainer.storage

    with_m, without = run(True), run(False)
    for key in ("total_loss", "loss_psm", "loss_mgd", "loss_cls"):
        assert [v for v, _ in with_m.history(key).values()] == [v for v, _ in without.history(key).values()], key
    hist = with_m.histories()
    assert "pseudo_quality/cytoplasm/precision" not in without.histories()
    for cls in ("cytoplasm", "nucleus"):
        for k in ("precision", "recall", "matched_iou", "precision@0.5", "recall@0.5"):
            vals = [v for v, _ in hist[f"pseudo_quality/{cls}/{k}"].values()]
            assert len(vals) == 2 and all(0.0 <= v <= 1.0 for v in vals)  # the 2 steps after burn-in
    assert [v for v, _ in hist["pseudo_quality/images"].values()] == [1.0, 1.0]


def test_missing_held_back_set_only_switches_the_monitor_off():
    """A config naming a held-back set that is not prepared (the quickstart's, reused on other data) trains on;
    the warning names the set and the missing file."""
    import logging

    from mmt_psm.instance import pseudo_label_monitor
    from mmt_psm.instance.pseudo_label_monitor import PseudoLabelMonitorHook

    register_cell_coco("monitor_missing_gt", "/nonexistent/unlabeled_gt.json", "/nonexistent", "prepare it")
    hook = PseudoLabelMonitorHook(10, ["monitor_missing_gt"], class_names=["a"])
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda rec: records.append(rec.getMessage())  # works whether or not the logger propagates
    pseudo_label_monitor.logger.addHandler(handler)
    try:
        hook.before_train()
    finally:
        pseudo_label_monitor.logger.removeHandler(handler)
    assert hook._gt == {}
    assert any("monitor_missing_gt" in m and "/nonexistent/unlabeled_gt.json" in m for m in records), records
