"""Atomic writes: a failed write keeps the previous file whole and leaves no temp file behind."""
import json
import os

import pytest

from mmt_psm.utils.atomic import write_json, write_text


def test_write_text_and_json_roundtrip(tmp_path):
    path = os.path.join(tmp_path, "sub", "results.md")
    write_text(path, "| a |\n")
    assert open(path).read() == "| a |\n"
    write_json(str(tmp_path / "r.json"), {"x": [1, 2]})
    assert json.load(open(tmp_path / "r.json")) == {"x": [1, 2]}
    assert open(tmp_path / "r.json").read().endswith("\n")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that fails before the rename (here: the rename itself) leaves the old file whole, no temp file."""
    import mmt_psm.utils.atomic as atomic

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
