"""Detectron2's meaning for Detectron2's keys: INPUT.RANDOM_FLIP (+ INPUT.VERTICAL_FLIP), and the unlabeled
stream cropping and resizing exactly like the labeled stream for every INPUT.CROP.TYPE."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from detectron2.config import get_cfg

from mmt_psm.config import add_mmt_psm_config
from mmt_psm.instance.coco_io import mask_to_rle
from mmt_psm.instance.mapper import CellDatasetMapper
from mmt_psm.instance.view_mapper import MMTPSMViewMapper


def _cfg(**input_keys):
    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    for k, v in input_keys.items():
        setattr(cfg.INPUT, k, v)
    return cfg


def _record(tmp_path, h, w):
    """An asymmetric image (a ramp in x plus a ramp in y) with one whole-image instance."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], 2)
    path = str(tmp_path / f"ramp_{h}x{w}.png")
    cv2.imwrite(path, img.astype(np.uint8))
    rle = mask_to_rle(np.ones((h, w), bool))
    return {"file_name": path, "image_id": 1, "height": h, "width": w,
            "annotations": [{"category_id": 0, "segmentation": rle, "iscrowd": 0, "bbox": [0, 0, w, h],
                             "bbox_mode": 1}]}, img.astype(np.uint8)


def _flips_seen(cfg, record, img, n=40):
    m = CellDatasetMapper(cfg, True)
    seen = set()
    for seed in range(n):
        np.random.seed(seed)
        out = m(record)["image"].numpy().transpose(1, 2, 0)
        kinds = {"none": img, "h": img[:, ::-1], "v": img[::-1], "hv": img[::-1, ::-1]}
        match = [k for k, ref in kinds.items() if np.array_equal(out, ref)]
        assert len(match) == 1, f"seed {seed}: output is not a flip of the input"
        seen.add(match[0])
    return seen


@pytest.mark.parametrize(
    "random_flip,vertical,expected",
    [("horizontal", False, {"none", "h"}), ("vertical", False, {"none", "v"}), ("none", False, {"none"}),
     ("horizontal", True, {"none", "h", "v", "hv"}), ("none", True, {"none", "v"}),
     ("vertical", True, {"none", "v"})],
)
def test_flips_follow_detectron2_random_flip_and_vertical_key(tmp_path, random_flip, vertical, expected):
    record, img = _record(tmp_path, 32, 48)
    cfg = _cfg(RANDOM_FLIP=random_flip, VERTICAL_FLIP=vertical, MIN_SIZE_TRAIN=(32,), MAX_SIZE_TRAIN=1000)
    assert _flips_seen(cfg, record, img) == expected


CROPS = [("relative", [0.5, 0.5]), ("relative_range", [0.3, 0.6]), ("absolute", [50, 70]),
         ("absolute_range", [40, 90])]


@pytest.mark.parametrize("crop_type,crop_size", CROPS)
def test_unlabeled_stream_crops_and_resizes_like_labeled(tmp_path, crop_type, crop_size):
    record, _ = _record(tmp_path, 120, 160)
    cfg = _cfg(MIN_SIZE_TRAIN=(48, 64, 80), MAX_SIZE_TRAIN=1000, RANDOM_FLIP="horizontal")
    cfg.INPUT.CROP.ENABLED, cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = True, crop_type, crop_size
    labeled, unlabeled = CellDatasetMapper(cfg, True), MMTPSMViewMapper(cfg)
    sizes = set()
    for seed in range(12):
        np.random.seed(seed)
        lab_hw = tuple(labeled(record)["image"].shape[1:])
        np.random.seed(seed)
        unl = unlabeled({k: record[k] for k in ("file_name", "image_id")})
        assert (unl["height"], unl["width"]) == lab_hw, f"seed {seed}"
        assert all(tuple(v.shape[1:]) == lab_hw for v in unl["teacher_views"] + [unl["student_view"]])
        sizes.add(lab_hw)
    # the whole 120x160 image resizes to one of these; the crops (other aspect ratios) give other sizes
    whole = {(48, 64), (64, 85), (80, 107)}
    assert crop_type == "relative" or not sizes <= whole, sizes
    assert len(sizes) > 1  # resize sizes (and range crops) vary with the seed, identically in both streams
