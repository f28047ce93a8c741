"""Atomic writes: a failed write keeps the previous file whole and leaves no temp file behind."""
import json
import os

import pytest

from mmt_psm.core.atomic import write_json, write_text


def test_write_text_and_json_roundtrip(tmp_path):
    path = os.path.join(tmp_path, "sub", "results.md")
    write_text(path, "| a |\n")
    assert open(path).read() == "| a |\n"
    write_json(str(tmp_path / "r.json"), {"x": [1, 2]})
    assert json.load(open(tmp_path / "r.json")) == {"x": [1, 2]}
    assert open(tmp_path / "r.json").read().endswith("\n")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that fails before the rename (here: the rename itself) leaves the old file whole, no temp file."""
    import mmt_psm.core.atomic as atomic

    path = str(tmp_path / "r.json")
    write_json(path, {"old": 1})

    def fail(src, dst):
        assert open(src).read() == '{\n "new": 2\n}\n'  # the temp file was written completely first
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"new": 2})
    assert json.load(open(path)) == {"old": 1}
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


def test_image_and_torch_writers_roundtrip_and_leave_no_temp_file(tmp_path):
    import cv2
    import numpy as np
    import torch

    from mmt_psm.core.atomic import save_torch, write_image

    lab = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000)  # a 16-bit instance map: PNG keeps it exactly
    write_image(str(tmp_path / "inst.png"), lab)
    back = cv2.imread(str(tmp_path / "inst.png"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back, lab)
    save_torch(str(tmp_path / "w.pth"), {"a": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "w.pth")["a"], torch.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["inst.png", "w.pth"]


def test_image_opencv_cannot_write_is_an_error_naming_the_file(tmp_path):
    import numpy as np

    from mmt_psm.core.atomic import write_image

    path = str(tmp_path / "map.png")
    write_image(path, np.zeros((2, 2), np.uint8))
    with pytest.raises(OSError, match=r"cannot write image .*map\.png .*float64.*channels"):
        write_image(path, np.zeros((2, 2, 7)))  # 7 channels: PNG cannot hold them, cv2.imwrite raises cv2.error
    assert sorted(os.listdir(tmp_path)) == ["map.png"]


def test_image_opencv_returning_false_is_an_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    import cv2
    import numpy as np

    from mmt_psm.core.atomic import write_image

    path = str(tmp_path / "map.png")
    write_image(path, np.full((2, 2), 7, np.uint8))
    monkeypatch.setattr(cv2, "imwrite", lambda *a, **k: False)  # e.g. a full disk: OpenCV only says False
    with pytest.raises(OSError, match=r"cannot write image .*map\.png \(shape \(2, 2\), dtype uint8\)$"):
        write_image(path, np.zeros((2, 2), np.uint8))
    monkeypatch.undo()
    assert cv2.imread(path, cv2.IMREAD_UNCHANGED).tolist() == [[7, 7], [7, 7]]
    assert sorted(os.listdir(tmp_path)) == ["map.png"]


def test_interrupted_write_removes_the_temp_file(tmp_path):
    """An exception inside the block (KeyboardInterrupt included) keeps the old file and removes the temp file."""
    from mmt_psm.core.atomic import atomic_path

    path = str(tmp_path / "a.txt")
    write_text(path, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".txt")
            open(tmp, "w").write("new, half")
            raise KeyboardInterrupt
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["a.txt"]
