"""Your own data without Python: DATASETS.REGISTER entries, bad images, class count, splits, unlabeled JSON."""
from __future__ import annotations

import json
import logging
import os

import cv2
import numpy as np
import pytest
from common import REPO, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from user_data import CATEGORY_ID, CLASS_NAME, write_user_dataset

from mmt_psm.core import Trainer, splits
from mmt_psm.instance.mapper import CellDatasetMapper
from mmt_psm.instance.user_datasets import (
    check_num_classes,
    parse_register_entry,
    register_datasets_from_config,
    register_user_dataset,
)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    return write_user_dataset(str(tmp_path_factory.mktemp("user")))


def test_parse_register_entry():
    assert parse_register_entry("a:x.json:imgs") == ("a", "x.json", "imgs")
    assert parse_register_entry("b:folder") == ("b", "folder", None)
    for bad in ("no_colon", "a:b:c:d", "a::c", ":x"):
        with pytest.raises(ValueError, match="DATASETS.REGISTER entry"):
            parse_register_entry(bad)


def test_coco_entry_maps_category_7_and_keeps_polygons(user):
    name = register_user_dataset(f"ud_train:{user['train']}:{user['image_root']}")
    meta = MetadataCatalog.get(name)  # known before loading anything
    assert meta.thing_classes == [CLASS_NAME]
    assert meta.thing_dataset_id_to_contiguous_id == {CATEGORY_ID: 0}
    assert meta.evaluator_type == "coco" and meta.json_file == user["train"]
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == [1000, 1001, 1002]
    assert all(a["category_id"] == 0 and isinstance(a["segmentation"], list)
               for d in dicts for a in d["annotations"])
    cfg = tiny_cfg("/tmp/unused")
    cfg.merge_from_list(["DATASETS.TRAIN", (name,), "MODEL.ROI_HEADS.NUM_CLASSES", 1])
    out = CellDatasetMapper(cfg, True)(dicts[0])
    assert out["image"].shape == (3, 128, 128) and len(out["instances"]) == 4
    assert out["instances"].gt_classes.tolist() == [0, 0, 0, 0]


def test_folder_and_glob_entries_and_gray_16bit_any_size(user, tmp_path):
    name = register_user_dataset(f"ud_unl:{user['unlabeled']}")
    dicts = DatasetCatalog.get(name)
    assert [os.path.basename(d["file_name"]) for d in dicts] == ["u0.png", "u1.png", "u2.png"]
    assert [d["image_id"] for d in dicts] == [0, 1, 2] and all(d["height"] == 128 for d in dicts)
    assert MetadataCatalog.get(name).unlabeled is True
    folder = tmp_path / "mixed"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.tif"), (np.arange(50 * 70, dtype=np.uint16).reshape(50, 70) * 9))
    cv2.imwrite(str(folder / "b.png"), np.full((33, 20), 7, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    dicts = DatasetCatalog.get(register_user_dataset(f"ud_glob:{folder}/*.*"))
    assert [(os.path.basename(d["file_name"]), d["height"], d["width"]) for d in dicts] == [
        ("a.tif", 50, 70), ("b.png", 33, 20)]


def _corrupt_folder(tmp_path):
    folder = tmp_path / "unl"
    folder.mkdir()
    for k in range(3):
        cv2.imwrite(str(folder / f"ok{k}.png"), np.full((16, 16, 3), 100, np.uint8))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "empty.jpg").write_bytes(b"")
    return folder


def test_corrupt_images_fail_at_load_listing_every_bad_file(tmp_path):
    folder = _corrupt_folder(tmp_path)
    name = register_user_dataset(f"ud_bad:{folder}")
    with pytest.raises(ValueError) as e:
        DatasetCatalog.get(name)
    msg = str(e.value)
    assert "'ud_bad': 2 of 5 images are unreadable" in msg and "DATASETS.BAD_IMAGES skip" in msg
    assert str(folder / "broken.png") in msg and str(folder / "empty.jpg") in msg
    assert "ok0.png" not in msg


def test_corrupt_images_skipped_with_counted_warning(tmp_path, caplog):
    folder = _corrupt_folder(tmp_path)
    name = register_user_dataset(f"ud_skip:{folder}", bad_images="skip")
    with caplog.at_level(logging.WARNING, logger="mmt_psm.instance.user_datasets"):
        dicts = DatasetCatalog.get(name)
    assert [os.path.basename(d["file_name"]) for d in dicts] == ["ok0.png", "ok1.png", "ok2.png"]
    assert "skipped 2 of 5 unreadable or mis-sized images" in caplog.text
    assert "broken.png" in caplog.text


def test_image_size_differing_from_json_is_a_bad_image(user, tmp_path):
    with open(user["test"]) as f:
        data = json.load(f)
    data["images"][0]["height"] = 99
    path = tmp_path / "wrong_size.json"
    path.write_text(json.dumps(data))
    name = register_user_dataset(f"ud_wrong:{path}:{user['image_root']}")
    with pytest.raises(ValueError, match=r"test_0.png: image is 128x128 \(HxW\) but its record says 99x128"):
        DatasetCatalog.get(name)


def test_unlabeled_coco_json_without_categories(user, tmp_path):
    images = [{"id": 5, "file_name": "u1.png", "height": 128, "width": 128},
              {"id": 9, "file_name": "u2.png", "height": 128, "width": 128}]
    path = tmp_path / "unl.json"
    path.write_text(json.dumps({"images": images}))
    name = register_user_dataset(f"ud_unl_json:{path}:{user['unlabeled']}")
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == [5, 9] and "annotations" not in dicts[0]
    assert MetadataCatalog.get(name).unlabeled is True
    assert "thing_classes" not in MetadataCatalog.get(name).as_dict()


def test_num_classes_mismatch_names_both_numbers(user, tmp_path):
    cfg = tiny_cfg(str(tmp_path))  # NUM_CLASSES 2
    cfg.merge_from_list(["DATASETS.REGISTER", (f"ud_nc:{user['train']}:{user['image_root']}",),
                         "DATASETS.TRAIN", ("ud_nc",)])
    msg = r"MODEL.ROI_HEADS.NUM_CLASSES is 2 but data set 'ud_nc' has 1 classes \['cell'\]"
    with pytest.raises(ValueError, match=msg):
        register_datasets_from_config(cfg)
    with pytest.raises(ValueError, match=msg):  # the Trainer itself refuses too (Python users)
        Trainer(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    register_datasets_from_config(cfg)
    check_num_classes(cfg, ["ud_nc"])


def test_split_of_user_base_keeps_metadata(user, tmp_path):
    register_user_dataset(f"ud_base:{user['train']}:{user['image_root']}")
    path = str(tmp_path / "split.json")
    splits.write_split(path, splits.make_split("ud_base", [1000, 1001, 1002], seed=1, count=1))
    lab, unl = splits.register_split(path)
    for name in (lab, unl):
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == [CLASS_NAME] and meta.evaluator_type == "coco"
        assert meta.thing_dataset_id_to_contiguous_id == {CATEGORY_ID: 0}
        assert meta.base_dataset == "ud_base"
        assert "json_file" not in meta.as_dict()  # the base file lists all images; AP must use the subset
    assert len(DatasetCatalog.get(lab)) == 1 and len(DatasetCatalog.get(unl)) == 2
    # COCO AP of the subset is computed on the subset's images only (not the base JSON's three)
    cfg = tiny_cfg(str(tmp_path / "out"))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    coco = Trainer.build_evaluator(cfg, lab)._evaluators[0]
    assert sorted(coco._coco_api.getImgIds()) == splits.load_split(path)["labeled_ids"]
    assert coco._coco_api.loadCats(coco._coco_api.getCatIds()) == [{"id": CATEGORY_ID, "name": CLASS_NAME}]


def test_split_file_of_another_data_set_is_an_error(user, tmp_path):
    """configs/mmt_psm_R50.yaml's ISBI split file must not silently replace the user's DATASETS.TRAIN."""
    from mmt_psm.core.trainer import training_dataset_names

    register_user_dataset(f"ud_own:{user['train']}:{user['image_root']}")
    cfg = tiny_cfg(str(tmp_path))
    isbi_split = os.path.join(REPO, "datasets", "splits", "isbi2015_train_n2_seed1.json")
    cfg.merge_from_list(["DATASETS.TRAIN", ("ud_own",), "DATASETS.SPLIT_FILE", isbi_split])
    with pytest.raises(ValueError, match=r"splits data set 'isbi2015_train', but DATASETS.TRAIN is \('ud_own',\)"):
        training_dataset_names(cfg)


def test_two_classes_rle_masks_16bit_gray_images(tmp_path):
    from mmt_psm.instance.coco_io import mask_to_rle

    img = (np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 20)  # 16-bit gray, values up to 47980
    cv2.imwrite(str(tmp_path / "g.png"), img)
    m1, m2 = np.zeros((40, 60), bool), np.zeros((40, 60), bool)
    m1[5:15, 5:20], m2[20:35, 30:50] = True, True
    anns = [{"id": 1, "image_id": 3, "category_id": 42, "segmentation": mask_to_rle(m1), "bbox": [5, 5, 15, 10],
             "area": 150, "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 5, "segmentation": mask_to_rle(m2), "bbox": [30, 20, 20, 15],
             "area": 300, "iscrowd": 0}]
    data = {"images": [{"id": 3, "file_name": "g.png", "height": 40, "width": 60}], "annotations": anns,
            "categories": [{"id": 42, "name": "nucleus"}, {"id": 5, "name": "cytoplasm"}]}
    (tmp_path / "g.json").write_text(json.dumps(data))
    name = register_user_dataset(f"ud_gray16:{tmp_path / 'g.json'}")  # images next to the JSON
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["cytoplasm", "nucleus"]  # in category-id order: 5, 42
    assert meta.thing_dataset_id_to_contiguous_id == {5: 0, 42: 1}
    cfg = tiny_cfg("/tmp/unused")
    cfg.merge_from_list(["DATASETS.TRAIN", (name,), "INPUT.MIN_SIZE_TRAIN", (40,), "INPUT.CROP.ENABLED", False,
                         "INPUT.RANDOM_FLIP", "none", "INPUT.VERTICAL_FLIP", False, "INPUT.BRIGHTNESS", 0.0,
                         "INPUT.CONTRAST", 0.0])
    out = CellDatasetMapper(cfg, True)(DatasetCatalog.get(name)[0])
    image = out["image"].numpy()
    assert image.shape == (3, 40, 60) and image.dtype == np.uint8 and image.max() == 255
    assert (image[0] == image[1]).all() and (image[1] == image[2]).all()  # gray replicated
    assert out["instances"].gt_classes.tolist() == [1, 0]
    assert out["instances"].gt_masks.tensor.sum(dim=(1, 2)).tolist() == [150, 300]


def test_make_splits_registers_a_user_data_set(user, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_splits", os.path.join(REPO, "tools", "make_splits.py"))
    make_splits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_splits)
    out = str(tmp_path / "split.json")
    make_splits.main(["--register", f"ud_ms:{user['train']}:{user['image_root']}", "--dataset", "ud_ms",
                      "--count", "2", "--seed", "1", "--output", out])
    split = splits.load_split(out)
    assert split["dataset"] == "ud_ms" and len(split["labeled_ids"]) == 2
    assert sorted(split["labeled_ids"] + split["unlabeled_ids"]) == [1000, 1001, 1002]
