"""CellDatasetMapper / read_image_checked on bad and unusual inputs: each a clear error or a documented outcome."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("detectron2")
import cv2  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402
from PIL import Image  # noqa: E402

from mmt_psm.config import add_mmt_psm_config  # noqa: E402
from mmt_psm.core import image_io
from mmt_psm.instance.coco_io import mask_to_rle  # noqa: E402
from mmt_psm.instance.mapper import CellDatasetMapper, read_image_checked  # noqa: E402

H = W = 32
CLASSES = ["cytoplasm", "nucleus"]


def _mapper(is_train=True, **kw):
    kw.setdefault("augmentations", [])
    return CellDatasetMapper(is_train, image_format="BGR", class_names=CLASSES, **kw)


def _png(tmp_path, array, name="im.png"):
    path = str(tmp_path / name)
    assert cv2.imwrite(path, array)
    return path


def _box_mask(y0, y1, x0, x1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _ann(segm, category_id=0, iscrowd=0):
    return dict(category_id=category_id, segmentation=segm, bbox=[0, 0, 1, 1], bbox_mode=BoxMode.XYWH_ABS,
                iscrowd=iscrowd)


def _dict(path, annos, h=H, w=W):
    return {"file_name": path, "height": h, "width": w, "image_id": 1, "annotations": annos}


@pytest.fixture
def gray(tmp_path):
    return _png(tmp_path, np.full((H, W), 77, np.uint8))


def test_missing_image(tmp_path):
    path = str(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match=f"cannot read image {path}: image file not found"):
        _mapper()(_dict(path, []))


@pytest.mark.parametrize("content", [b"this is not a png", b""])
def test_corrupt_or_empty_image(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"cannot read image {path}: cannot decode image file"):
        _mapper()(_dict(str(path), []))


def test_empty_annotation_list_gives_empty_instances(gray):
    out = _mapper()(_dict(gray, []))
    inst = out["instances"]
    assert len(inst) == 0 and inst.image_size == (H, W)
    assert tuple(inst.gt_masks.tensor.shape) == (0, H, W) and tuple(inst.gt_boxes.tensor.shape) == (0, 4)
    assert out["num_empty_masks_dropped"] == 0


def test_zero_area_mask_dropped_and_counted(gray):
    annos = [_ann(mask_to_rle(np.zeros((H, W), bool))), _ann(mask_to_rle(_box_mask(2, 6, 3, 9)), 1)]
    out = _mapper()(_dict(gray, annos))
    assert out["num_empty_masks_dropped"] == 1
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [1]
    assert inst.gt_boxes.tensor.tolist() == [[3.0, 2.0, 9.0, 6.0]]  # recomputed from the mask
    assert (inst.gt_masks.tensor[0].numpy() == _box_mask(2, 6, 3, 9)).all()


def test_polygon_out_of_bounds_is_clipped_or_dropped(gray):
    partly = [[-10.0, -10.0, 20.0, -10.0, 20.0, 20.0, -10.0, 20.0]]
    outside = [[40.0, 40.0, 50.0, 40.0, 50.0, 50.0]]
    out = _mapper()(_dict(gray, [_ann(partly), _ann(outside)]))
    assert out["num_empty_masks_dropped"] == 1
    mask = out["instances"].gt_masks.tensor[0].numpy()
    assert (mask == _box_mask(0, 20, 0, 20)).all()  # the in-image 20x20 part, exactly


def test_unknown_category_id(gray):
    with pytest.raises(ValueError, match=rf"{gray}: annotation category_id 5 is not one of"):
        _mapper()(_dict(gray, [_ann(mask_to_rle(_box_mask(1, 4, 1, 4)), category_id=5)]))


def test_rle_of_wrong_size_and_missing_mask(gray):
    with pytest.raises(ValueError, match=rf"{gray}: RLE mask size \(16, 16\) != image \(32, 32\)"):
        _mapper()(_dict(gray, [_ann(mask_to_rle(np.ones((16, 16), bool)))]))
    box_only = {"category_id": 0, "bbox": [1, 1, 3, 3], "bbox_mode": BoxMode.XYWH_ABS}
    with pytest.raises(ValueError, match=f"{gray}: annotation without a usable mask"):
        _mapper()(_dict(gray, [box_only]))


def test_crowd_annotations_ignored(gray):
    out = _mapper()(_dict(gray, [_ann(mask_to_rle(_box_mask(1, 4, 1, 4)), iscrowd=1)]))
    assert len(out["instances"]) == 0


def test_size_mismatch_with_record(gray):
    with pytest.raises(ValueError, match=f"Mismatched image shape for image {gray}"):
        _mapper()(_dict(gray, [], h=64, w=64))


def test_16bit_png_rescaled_min_max(tmp_path):
    path = _png(tmp_path, np.array([[1000, 3000], [5000, 5000]], np.uint16))
    img = read_image_checked(path, "BGR")
    assert img.dtype == np.uint8 and img.shape == (2, 2, 3)
    assert (img[..., 0] == [[0, 128], [255, 255]]).all() and (img == img[..., :1]).all()
    flat = read_image_checked(_png(tmp_path, np.full((2, 2), 4000, np.uint16), "flat.png"))
    assert (flat == 0).all()


def test_grayscale_and_rgb_channel_order(tmp_path, gray):
    for fmt in ("BGR", "RGB"):
        assert (read_image_checked(gray, fmt) == 77).all()
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 20, 30  # cv2 writes B, G, R
    path = _png(tmp_path, bgr, "colour.png")
    assert read_image_checked(path, "BGR")[0, 0].tolist() == [10, 20, 30]
    assert read_image_checked(path, "RGB")[0, 0].tolist() == [30, 20, 10]
    with pytest.raises(ValueError, match="unsupported image format 'YUV'"):
        read_image_checked(path, "YUV")


def test_alpha_channels_dropped(tmp_path):
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., :3], bgra[..., 3] = (10, 20, 30), 128
    assert read_image_checked(_png(tmp_path, bgra, "bgra.png"), "BGR")[0, 0].tolist() == [10, 20, 30]
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0], la[..., 1] = 99, 255
    Image.fromarray(la, "LA").save(tmp_path / "la.png")  # gray + alpha
    assert (read_image_checked(str(tmp_path / "la.png")) == 99).all()


def test_other_channel_counts_rejected(tmp_path, monkeypatch, gray):
    monkeypatch.setattr(image_io.cv2, "imdecode", lambda *a: np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=rf"image file {gray} has shape \(4, 4, 5\)"):
        read_image_checked(gray)


def test_test_mode_needs_no_annotations(gray):
    m = _mapper(is_train=False, augmentations=[T.ResizeShortestEdge(64, 1000)])
    out = m({"file_name": gray, "height": H, "width": W, "image_id": 3})
    assert tuple(out["image"].shape) == (3, 64, 64) and "instances" not in out
    out = m(_dict(gray, [_ann(mask_to_rle(_box_mask(1, 4, 1, 4)), category_id=9)]))  # not even validated
    assert "annotations" not in out and "instances" not in out


@pytest.mark.parametrize("tries", [10, 0])
def test_crop_never_loses_every_instance(tmp_path, tries):
    path = _png(tmp_path, np.zeros((64, 64), np.uint8))
    d = _dict(path, [_ann(mask_to_rle(_box_mask(60, 63, 60, 63, 64, 64)))], 64, 64)
    m = _mapper(crop=T.RandomCrop("absolute", (16, 16)), crop_tries=tries)
    for seed in range(30):
        np.random.seed(seed)
        out = m(d)
        assert out is not None and len(out["instances"]) == 1 and tuple(out["image"].shape) == (3, 16, 16)


def test_masks_stay_aligned_with_image_through_all_augmentations(tmp_path):
    mask = _box_mask(5, 20, 8, 30, 40, 48) | _box_mask(25, 38, 2, 6, 40, 48)
    path = _png(tmp_path, np.where(mask, 200, 0).astype(np.uint8))
    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (60,), 1000
    cfg.INPUT.CROP.ENABLED, cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = True, "absolute", [30, 30]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.INPUT.VERTICAL_FLIP = True  # Detectron2's horizontal flip (RANDOM_FLIP default) + a vertical one
    m = CellDatasetMapper(cfg, True)
    assert [type(a).__name__ for a in m.augmentations.augs] == ["ResizeShortestEdge", "RandomFlip", "RandomFlip"]
    d = _dict(path, [_ann(mask_to_rle(mask))], 40, 48)
    for seed in range(10):
        np.random.seed(seed)
        out = m(d)
        bright = out["image"][0].numpy() > 100
        assert (out["instances"].gt_masks.tensor[0].numpy() == bright).all()


def test_config_checks():
    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    with pytest.raises(ValueError, match="set INPUT.MASK_FORMAT to bitmask, not 'polygon'"):
        CellDatasetMapper(cfg, True)
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.INPUT.BRIGHTNESS, cfg.INPUT.CONTRAST = 0.2, 0.1
    names = [type(a).__name__ for a in CellDatasetMapper(cfg, True).augmentations.augs]
    assert names[-2:] == ["RandomBrightness", "RandomContrast"]
    assert [type(a).__name__ for a in CellDatasetMapper(cfg, False).augmentations.augs] == ["ResizeShortestEdge"]
