"""DATASETS.SPLIT_FILE inside the Trainer: the labeled stream holds exactly the split's labeled ids, the unlabeled
stream the split's other ids plus DATASETS.TRAIN_UNLABELED; a malformed split file is a clear error."""
import json
import os

import pytest
from common import tiny_cfg, tiny_synthetic
from detectron2.data import DatasetCatalog

from mmt_psm.core import Trainer
from mmt_psm.core.splits import make_split, write_split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tiny_synthetic(str(tmp_path_factory.mktemp("sp")), prefix="sp", n_train=4, n_test=1, n_unlabeled=2)
    return "sp"


def _files(name, ids=None):
    return {os.path.basename(d["file_name"]) for d in DatasetCatalog.get(name) if ids is None or d["image_id"] in ids}


def _cfg(tmp_path, data, split_file):
    cfg = tiny_cfg(str(tmp_path / "out"), data, "MMTPSMRCNN")
    cfg.merge_from_list(["DATASETS.SPLIT_FILE", split_file])
    return cfg


def test_trainer_streams_follow_the_split_file(data, tmp_path):
    ids = [d["image_id"] for d in DatasetCatalog.get("sp_train")]
    split = make_split("sp_train", ids, seed=1, count=2)
    path = str(tmp_path / "split.json")
    write_split(path, split)
    trainer = Trainer(_cfg(tmp_path, data, path))
    labeled, unlabeled = [], []
    it = iter(trainer._trainer.data_loader)
    for _ in range(8):  # 1 + 1 images per step: 4 passes over the 2 labeled, 2 over the 4 unlabeled images
        batch = next(it)
        labeled += [d for d in batch if d["labeled"]]
        unlabeled += [d for d in batch if not d["labeled"]]
    lab_files = _files("sp_train", set(split["labeled_ids"]))
    unl_files = _files("sp_train", set(split["unlabeled_ids"])) | _files("sp_unlabeled")
    assert len(lab_files) == 2 and len(unl_files) == 4
    assert {os.path.basename(d["file_name"]) for d in labeled} == lab_files
    assert {os.path.basename(d["file_name"]) for d in unlabeled} == unl_files
    assert all(len(d["instances"]) > 0 for d in labeled)  # annotations kept on the labeled side only
    assert all("instances" not in d and "teacher_views" in d for d in unlabeled)


_DROP = object()


def _bad_split(case, ids):
    """A split record over ``ids`` broken in one way (or raw text)."""
    good = {"dataset": "sp_train", "seed": 1, "count": 1, "percent": None, "labeled_ids": [ids[0]],
            "unlabeled_ids": ids[1:]}
    edits = {
        "missing key": {"unlabeled_ids": _DROP},
        "string ids": {"labeled_ids": ["a", "b"]},
        "ids not a list": {"unlabeled_ids": 3},
        "duplicate id": {"labeled_ids": [ids[0], ids[0]]},
        "no labeled id": {"labeled_ids": []},
        "overlap": {"unlabeled_ids": ids},
        "unknown id": {"labeled_ids": [ids[0], 999]},
    }[case]
    split = {k: v for k, v in {**good, **edits}.items() if v is not _DROP}
    return json.dumps(split)


@pytest.mark.parametrize("case,message", [
    ("not json", "is not valid JSON"),
    ("not an object", "must hold a JSON object"),
    ("missing key", r"lacks keys \['unlabeled_ids'\]"),
    ("string ids", "labeled_ids must be a list of integer image ids"),
    ("ids not a list", "unlabeled_ids must be a list of integer image ids"),
    ("duplicate id", "labeled_ids lists an id twice"),
    ("no labeled id", "labeled_ids is empty"),
    ("overlap", "ids both labeled and unlabeled"),
    ("unknown id", r"image ids \[999\] are not in data set sp_train"),
])
def test_malformed_split_file_is_a_clear_error(data, tmp_path, case, message):
    ids = sorted(d["image_id"] for d in DatasetCatalog.get("sp_train"))
    text = {"not json": "{not json", "not an object": "[1, 2]"}.get(case) or _bad_split(case, ids)
    path = str(tmp_path / "bad_split.json")
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match=message) as err:
        Trainer(_cfg(tmp_path, data, path))
    assert path in str(err.value)  # the message names the file
