"""SemanticSliceMapper: intensity scaling, channels, label checks, SSL4MIS augmentation with ignore-safe warps."""
import random

import cv2
import numpy as np
import pytest
from detectron2.config import get_cfg

from mmt_psm.config import add_mmt_psm_config
from mmt_psm.core.registry import build_dataset_mapper
from mmt_psm.semantic.slice_mapper import SemanticSliceMapper, _warp_label, augment_slice


def _cfg(size=(16, 20), channels=1, augment=True):
    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    cfg.merge_from_list(["INPUT.DATASET_MAPPER_NAME", "semantic_slice", "INPUT.FIXED_SIZE", size,
                         "MODEL.PIXEL_MEAN", [0.0] * channels, "MODEL.PIXEL_STD", [1.0] * channels,
                         "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 4, "MODEL.SEM_SEG_HEAD.IGNORE_VALUE", 255,
                         "INPUT.SLICE_AUGMENT", augment])
    return cfg


def _files(tmp_path, image, label):
    cv2.imwrite(str(tmp_path / "img.png"), image)
    cv2.imwrite(str(tmp_path / "lab.png"), label)
    return {"file_name": str(tmp_path / "img.png"), "sem_seg_file_name": str(tmp_path / "lab.png")}


def test_16bit_image_scaled_and_resized_for_test(tmp_path):
    img = np.full((8, 10), 65535, np.uint16)
    img[0, 0] = 0
    lab = np.zeros((8, 10), np.uint8)
    lab[2:6, 2:6] = 3
    d = SemanticSliceMapper(_cfg(size=(16, 20)), is_train=False)(_files(tmp_path, img, lab))
    assert d["image"].shape == (1, 16, 20) and d["image"].max().item() == pytest.approx(255.0)
    assert d["sem_seg"].shape == (16, 20) and set(d["sem_seg"].unique().tolist()) == {0, 3}
    assert (d["height"], d["width"]) == (8, 10)  # predictions are resized back to the original size


def test_grey_to_three_channels_and_channel_mismatch(tmp_path):
    lab = np.zeros((6, 6), np.uint8)
    rec = _files(tmp_path, np.full((6, 6), 100, np.uint8), lab)
    d = SemanticSliceMapper(_cfg(size=(0, 0), channels=3), is_train=False)(rec)
    assert d["image"].shape == (3, 6, 6) and (d["image"] == 100).all()
    cv2.imwrite(str(tmp_path / "img.png"), np.zeros((6, 6, 3), np.uint8))
    with pytest.raises(ValueError, match=r"img\.png: image has 3 channels but MODEL.PIXEL_MEAN has 1"):
        SemanticSliceMapper(_cfg(size=(0, 0)), is_train=False)(rec)


def test_bad_label_values_and_shape_and_missing_file(tmp_path):
    lab = np.zeros((6, 6), np.uint8)
    lab[0, 0] = 9
    rec = _files(tmp_path, np.zeros((6, 6), np.uint8), lab)
    with pytest.raises(ValueError, match=r"lab\.png: label values \[9\] outside 0\.\.3"):
        SemanticSliceMapper(_cfg(), is_train=False)(rec)
    cv2.imwrite(str(tmp_path / "lab.png"), np.zeros((5, 6), np.uint8))
    with pytest.raises(ValueError, match="does not match image"):
        SemanticSliceMapper(_cfg(), is_train=False)(rec)
    with pytest.raises(OSError, match="cannot read image .*nothere.png"):
        SemanticSliceMapper(_cfg(), is_train=False)({"file_name": str(tmp_path / "nothere.png")})
    with pytest.raises(ValueError, match="needs 'sem_seg_file_name'"):
        build_dataset_mapper(_cfg(), True)({"file_name": str(tmp_path / "img.png")})


def test_rotation_brings_ignore_not_background():
    lab = np.ones((20, 20), np.int64)  # all RV
    matrix = cv2.getRotationMatrix2D((9.5, 9.5), 30.0, 1.0)
    out = _warp_label(lab, matrix, (20, 20), 255)
    assert set(np.unique(out).tolist()) == {1, 255}  # corners come from outside: ignored, never class 0
    assert out[10, 10] == 1 and out[0, 0] == 255


def test_augment_keeps_image_and_label_aligned():
    """Whatever the draw (rot90+flip or rotation), the label is where the bright image pixels are."""
    img = np.zeros((24, 24, 1), np.float32)
    img[4:10, 6:14] = 200.0
    lab = (img[:, :, 0] > 0).astype(np.int64) * 2
    for seed in range(12):
        random.seed(seed)
        a_img, a_lab = augment_slice(img, lab, 20.0, 255)
        inside = a_lab == 2
        assert inside.any()
        assert a_img[:, :, 0][inside].mean() > 150 and a_img[:, :, 0][a_lab == 0].mean() < 50


def test_unknown_mapper_name():
    cfg = _cfg()
    cfg.INPUT.DATASET_MAPPER_NAME = "nope"
    expected = "DATASET_MAPPER_NAME must be 'cell' or 'psm_nuclei' or 'semantic_slice', got 'nope'"
    with pytest.raises(ValueError, match=expected):
        build_dataset_mapper(cfg, True)
