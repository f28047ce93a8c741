"""3D Dice / HD95 against hand cases and medpy, the empty-case convention, and the slice-stacking evaluator."""
import math
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from mmt_psm.semantic.volume_evaluator import VolumeSegEvaluator, summarize
from mmt_psm.semantic.volume_metrics import dice_hd95, largest_components, volume_scores


def test_dice_hand_case():
    gt = np.zeros((4, 10, 10), bool)
    gt[1:3, 2:6, 2:6] = True  # 32 voxels
    pred = np.zeros_like(gt)
    pred[1:3, 4:8, 2:6] = True  # 32 voxels, 16 shared
    d, _ = dice_hd95(pred, gt)
    assert d == pytest.approx(2 * 16 / 64)


def test_hd95_of_a_shifted_plate_is_the_shift():
    gt = np.zeros((3, 20, 20), bool)
    gt[1, 5:15, 5:15] = True
    pred = np.roll(gt, 2, axis=2)  # every surface point of one is 2 voxels from the other... at most
    d, h = dice_hd95(pred, gt)
    assert d == pytest.approx(2 * 80 / 200)
    assert h == pytest.approx(2.0)
    # with a spacing the distance is in millimetres
    _, h_mm = dice_hd95(pred, gt, spacing=(5.0, 1.5, 1.5))
    assert h_mm == pytest.approx(3.0)


def test_empty_cases_convention():
    empty = np.zeros((2, 5, 6), bool)
    one = empty.copy()
    one[0, 1, 1] = True
    assert dice_hd95(empty, empty) == (1.0, 0.0)
    d, h = dice_hd95(empty, one)
    assert d == 0.0 and h == pytest.approx(math.sqrt(1 + 16 + 25))  # the volume's diagonal
    assert dice_hd95(one, empty)[0] == 0.0


def test_volume_scores_per_class_against_medpy():
    from medpy.metric import binary

    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (5, 16, 16))
    pred = np.where(rng.random(gt.shape) < 0.8, gt, rng.integers(0, 4, gt.shape))
    scores = volume_scores(pred, gt, {1: "RV", 2: "Myo", 3: "LV"})
    for value, name in {1: "RV", 2: "Myo", 3: "LV"}.items():
        assert scores[f"Dice-{name}"] == pytest.approx(binary.dc(pred == value, gt == value))
        assert scores[f"HD95-{name}"] == pytest.approx(binary.hd95(pred == value, gt == value))


def test_summarize_mean_std_over_volumes():
    per = {"a": {"Dice-RV": 0.5, "HD95-RV": 2.0}, "b": {"Dice-RV": 1.0, "HD95-RV": 4.0}}
    s = summarize(per, ["RV"])
    assert s["Dice-RV"] == pytest.approx(0.75) and s["Dice-RV_std"] == pytest.approx(0.25)
    assert s["HD95"] == pytest.approx(3.0) and s["num_volumes"] == 2


def test_evaluator_stacks_slices_in_order(tmp_path):
    """Slices processed out of order are stacked by slice index; a perfect prediction scores Dice 1, HD95 0,
    and a volume whose middle slice's LV is missed loses exactly that slice's voxels."""
    gts, dicts = [], []
    for s in range(3):
        lab = np.zeros((12, 14), np.uint8)
        lab[2:8, 3:9] = 2
        lab[4:6, 5:7] = 3
        lab[9:11, 1:4] = 1
        path = str(tmp_path / f"gt{s}.png")
        cv2.imwrite(path, lab)
        gts.append(lab)
        dicts.append({"file_name": path, "sem_seg_file_name": path, "volume_id": "v1", "slice_index": s})
    name = "volume_eval_test"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(stuff_classes=["background", "RV", "Myo", "LV"], ignore_label=255,
                                  volume_classes=["RV", "Myo", "LV"])
    ev = VolumeSegEvaluator(name, output_dir=str(tmp_path), distributed=False)
    ev.reset()
    for s in (2, 0, 1):
        pred = gts[s].copy()
        if s == 1:
            pred[pred == 3] = 2  # LV of the middle slice predicted as Myo
        logits = torch.nn.functional.one_hot(torch.as_tensor(pred).long(), 4).permute(2, 0, 1).float()
        ev.process([dicts[s]], [{"sem_seg": logits}])
    res = ev.evaluate()["sem_seg_volume"]
    assert res["Dice-RV"] == 1.0 and res["HD95-RV"] == 0.0
    assert res["Dice-LV"] == pytest.approx(2 * 8 / (8 + 12))
    myo_gt, myo_pred = 3 * 32, 3 * 32 + 4
    assert res["Dice-Myo"] == pytest.approx(2 * myo_gt / (myo_gt + myo_pred))
    assert os.path.isfile(tmp_path / "volume_metrics.json")


def test_largest_components_keeps_each_structures_largest_3d_component():
    pred = np.zeros((3, 10, 10), np.uint8)
    pred[0:3, 1:4, 1:4] = 1  # RV: 27 voxels ...
    pred[1, 8, 8] = 1  # ... and a 1-voxel island
    pred[0, 6:9, 1:3] = 2  # Myo: 6 voxels on slice 0 ...
    pred[2, 6:9, 1:4] = 2  # ... 9 on slice 2 (not face-connected across slice 1)
    pred[1, 5, 5] = 3  # LV: a single component stays
    out = largest_components(pred, [1, 2, 3])
    expected = pred.copy()
    expected[1, 8, 8] = 0
    expected[0, 6:9, 1:3] = 0
    np.testing.assert_array_equal(out, expected)
    assert pred[1, 8, 8] == 1  # the input is not modified
    # a face-connected chain across slices is one component: nothing removed
    chain = np.zeros((3, 4, 4), np.uint8)
    chain[0, 0, 0] = chain[1, 0, 0] = chain[2, 0, 0] = chain[2, 3, 3] = 1
    assert largest_components(chain, [1]).sum() == 3


def test_evaluator_with_largest_component_drops_an_island(tmp_path):
    """A false island far from the structure costs Dice and HD95; the switch removes it before scoring."""
    lab = np.zeros((20, 20), np.uint8)
    lab[2:8, 2:8] = 3
    path = str(tmp_path / "gt.png")
    cv2.imwrite(path, lab)
    name = "volume_eval_cc_test"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    dicts = [{"file_name": path, "sem_seg_file_name": path, "volume_id": "v", "slice_index": 0}]
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(stuff_classes=["background", "RV", "Myo", "LV"], ignore_label=255,
                                  volume_classes=["RV", "Myo", "LV"])
    pred = lab.copy()
    pred[14:19, 14:19] = 3  # 25-voxel island, ~10 voxels away
    logits = torch.nn.functional.one_hot(torch.as_tensor(pred).long(), 4).permute(2, 0, 1).float()
    scores = {}
    for flag in (False, True):
        ev = VolumeSegEvaluator(name, distributed=False, largest_component=flag)
        ev.reset()
        ev.process(dicts, [{"sem_seg": logits}])
        scores[flag] = ev.evaluate()["sem_seg_volume"]
    assert scores[False]["Dice-LV"] == pytest.approx(2 * 36 / (36 + 61))
    assert scores[False]["HD95-LV"] > 10
    assert scores[True]["Dice-LV"] == 1.0 and scores[True]["HD95-LV"] == 0.0
