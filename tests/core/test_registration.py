"""Data set registration on import, missing-file errors naming the prepare command, seeded split files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("detectron2")
import cv2  # noqa: E402
from common import REPO  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

import mmt_psm  # noqa: E402, F401  (registers on import)
from mmt_psm.core import splits  # noqa: E402
from mmt_psm.instance import datasets as ds  # noqa: E402
from mmt_psm.instance.coco_io import image_record, masks_to_annotations, write_coco_json  # noqa: E402

BUILTIN = [
    "isbi2015_train", "isbi2015_test", "isbi2015_unlabeled", "isbi2014_synth45",
    "synthetic_train", "synthetic_test", "synthetic_unlabeled",
]


@pytest.fixture
def empty_base(tmp_path, monkeypatch):
    """Built-in data sets re-registered under an empty DETECTRON2_DATASETS; restored afterwards."""
    original = ds.datasets_base()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    ds.register_all()
    yield tmp_path
    ds.register_all(original)


def test_builtin_datasets_registered_on_import():
    for name in BUILTIN:
        assert name in DatasetCatalog.list(), name
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["cytoplasm", "nucleus"]
        assert meta.evaluator_type == "cell"
        assert meta.json_file.endswith(".json") and meta.image_root


def test_registration_paths_follow_detectron2_datasets(empty_base):
    meta = MetadataCatalog.get("isbi2015_test")
    assert meta.json_file == os.path.join(str(empty_base), "cervical", "isbi2015", "test.json")
    assert meta.image_root == os.path.join(str(empty_base), "cervical", "isbi2015")
    synth_images = os.path.join(str(empty_base), "synthetic", "images")
    assert MetadataCatalog.get("synthetic_train").image_root == synth_images


@pytest.mark.parametrize(
    "name,command", [("isbi2015_train", "python datasets/prepare_cervical.py"),
                     ("isbi2014_synth45", "python datasets/prepare_cervical.py"),
                     ("synthetic_unlabeled", "python datasets/prepare_synthetic.py")]
)
def test_missing_json_names_file_and_prepare_command(empty_base, name, command):
    with pytest.raises(FileNotFoundError) as e:
        DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).json_file in str(e.value)
    assert command in str(e.value)


def _write_tiny(tmp_path, ids=(11, 15, 12, 30, 17), write_images=True):
    """A tiny cell COCO data set with non-contiguous ids; returns (json_file, image_root)."""
    root = tmp_path / "tiny"
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for k, i in enumerate(ids):
        fn = f"images/im{k}.png"
        if write_images:
            cv2.imwrite(str(root / fn), np.full((8, 8), 100, np.uint8))
        images.append(image_record(i, fn, 8, 8))
        m = np.zeros((1, 8, 8), bool)
        m[0, 2:5, 2:5] = True
        anns += masks_to_annotations(m, 1, i, len(anns) + 1)
    write_coco_json(str(root / "train.json"), images, anns)
    return str(root / "train.json"), str(root)


def test_missing_image_names_image_and_prepare_command(tmp_path):
    json_file, root = _write_tiny(tmp_path, write_images=False)
    ds.register_cell_coco("tiny_missing_images", json_file, root, "python make_tiny.py")
    with pytest.raises(FileNotFoundError, match=r"im0\.png.*python make_tiny\.py"):
        DatasetCatalog.get("tiny_missing_images")


def test_unlabeled_registration_strips_annotations(tmp_path):
    json_file, root = _write_tiny(tmp_path)
    ds.register_cell_coco("tiny_unl", json_file, root, "x", strip_annotations=True)
    assert all("annotations" not in d for d in DatasetCatalog.get("tiny_unl"))


def test_split_same_seed_same_ids_different_seed_different():
    ids = [103, 7, 42, 55, 900, 64, 18, 2, 77, 31]
    a = splits.make_split("d", ids, seed=1, count=3)
    assert a == splits.make_split("d", list(reversed(ids)), seed=1, count=3)  # order of input irrelevant
    assert a["labeled_ids"] != splits.make_split("d", ids, seed=2, count=3)["labeled_ids"]
    assert set(a["labeled_ids"]) <= set(ids)  # ids, not indices
    assert sorted(a["labeled_ids"] + a["unlabeled_ids"]) == sorted(ids)
    assert a["labeled_ids"] == sorted(a["labeled_ids"])


def test_split_is_pinned_across_machines():
    # random.Random(seed).sample is specified by Python; these values must never change.
    assert splits.make_split("isbi2015_train", [1, 2, 3, 4, 6, 7], seed=1, count=2)["labeled_ids"] == [2, 6]
    assert splits.make_split("x", list(range(1, 46)), seed=1, percent=10)["labeled_ids"] == [5, 8, 9, 17, 37]
    assert splits.num_labeled(45, percent=10) == 5 and splits.num_labeled(3, percent=1) == 1
    with pytest.raises(ValueError):
        splits.num_labeled(5, count=6)


def test_committed_isbi2015_split_file():
    split = splits.load_split(os.path.join(REPO, "datasets", "splits", "isbi2015_train_n2_seed1.json"))
    assert split == splits.make_split("isbi2015_train", [1, 2, 3, 4, 6, 7], seed=1, count=2)
    assert split["labeled_ids"] == [2, 6]  # frame011, frame016
    names = ("isbi2015_train@seed1_n2_labeled", "isbi2015_train@seed1_n2_unlabeled")
    assert splits.split_names(split) == names


def test_register_split_and_cli(tmp_path):
    import importlib.util

    json_file, root = _write_tiny(tmp_path)
    ds.register_cell_coco("tiny_cells", json_file, root, "x")
    script = os.path.join(REPO, "tools", "make_splits.py")
    spec = importlib.util.spec_from_file_location("make_splits", script)
    make_splits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_splits)
    out = str(tmp_path / "split.json")
    make_splits.main(["--dataset", "tiny_cells", "--percent", "40", "--seed", "3", "--output", out])
    split = json.load(open(out))
    expected = splits.make_split("tiny_cells", [11, 12, 15, 17, 30], 3, percent=40)
    assert split["labeled_ids"] == expected["labeled_ids"] == [12, 30]
    lab, unl = splits.register_split(out)
    assert (lab, unl) == ("tiny_cells@seed3_p40_labeled", "tiny_cells@seed3_p40_unlabeled")
    lab_dicts, unl_dicts = DatasetCatalog.get(lab), DatasetCatalog.get(unl)
    assert [d["image_id"] for d in lab_dicts] == split["labeled_ids"]
    assert [d["image_id"] for d in unl_dicts] == split["unlabeled_ids"]
    assert all(len(d["annotations"]) == 1 for d in lab_dicts)
    assert all("annotations" not in d for d in unl_dicts)
    assert MetadataCatalog.get(unl).thing_classes == ["cytoplasm", "nucleus"]

    split["labeled_ids"] = [12, 999]
    bad = str(tmp_path / "bad.json")
    with open(bad, "w") as f:
        json.dump(split, f)
    with pytest.raises(ValueError, match="999"):
        DatasetCatalog.get(splits.register_split(bad)[0])
