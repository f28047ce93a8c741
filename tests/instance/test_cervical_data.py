"""Cervical converters: official .mat vs staged npz, counts, exact RLE round trip, prepared layout."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
from common import REPO, SHARED_DATA

from mmt_psm.instance import cervical

CERVICAL = os.path.join(SHARED_DATA, "cervical")

needs_data = pytest.mark.skipif(
    not os.path.isdir(CERVICAL),
    reason=f"staged cervical data not found at {CERVICAL} (set MMT_PSM_SHARED_DATA to the shared data root)",
)


def test_nucleus_instances_are_8_connected():
    binary = np.zeros((6, 6), np.uint8)
    binary[1, 1] = binary[2, 2] = 255  # diagonal neighbours: one 8-connected nucleus
    binary[4, 4:6] = 255
    inst = cervical.nucleus_instances(binary)
    assert inst.shape == (2, 6, 6) and inst.dtype == bool
    assert inst[0].sum() == 2 and inst[1].sum() == 2
    assert (inst.sum(0) == (binary > 0)).all()


@needs_data
def test_official_mat_equals_staged_npz():
    subset = os.path.join(CERVICAL, "isbi2014_synth45")
    n = 0
    for name, cyto, nuclei in cervical.read_official_mat(os.path.join(subset, "isbi_train_GT.mat")):
        cyto_npz, nuclei_png = cervical.read_staged(subset, name)
        assert cyto.shape == cyto_npz.shape and (cyto == cyto_npz).all(), name
        assert nuclei.shape == nuclei_png.shape and (nuclei == nuclei_png).all(), name
        assert len(nuclei) == len(cyto), name  # one nucleus per synthetic cell with 8-connectivity
        n += 1
    assert n == 45


@needs_data
def test_isbi2015_counts_match_frames_tsv():
    subset = os.path.join(CERVICAL, "isbi2015")
    rows = cervical.read_frames_tsv(os.path.join(subset, "frames.tsv"))
    assert sorted(r["split"] for r in rows) == ["test"] * 6 + ["train"] * 6
    n_cyto = n_nuc = 0
    for r in rows:
        cyto, nuclei = cervical.read_staged(subset, r["frame"])
        assert (len(cyto), len(nuclei)) == (int(r["n_cytoplasm"]), int(r["n_nuclei_cc"])), r["frame"]
        assert cyto.any(axis=(1, 2)).all() and nuclei.any(axis=(1, 2)).all()
        n_cyto, n_nuc = n_cyto + len(cyto), n_nuc + len(nuclei)
    assert (n_cyto, n_nuc) == (517, 510)


def _decode(anns, category_id):
    masks = [mask_util.decode(a["segmentation"]) for a in anns if a["category_id"] == category_id]
    return np.stack(masks).astype(bool)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    if not os.path.isdir(CERVICAL):
        pytest.skip(f"staged cervical data not found at {CERVICAL}")
    script = os.path.join(REPO, "datasets", "prepare_cervical.py")
    spec = importlib.util.spec_from_file_location("prepare_cervical", script)
    prepare_cervical = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_cervical)

    out = str(tmp_path_factory.mktemp("d2") / "cervical")
    prepare_cervical.main(["--source", CERVICAL, "--output", out])
    return out, prepare_cervical


def test_rle_round_trip_is_exact_including_overlaps(prepared):
    out, _ = prepared
    n_cyto = n_nuc = 0
    overlapping = 0
    for split in ("train", "test"):
        with open(os.path.join(out, "isbi2015", f"{split}.json")) as f:
            coco = json.load(f)
        assert [c["name"] for c in coco["categories"]] == ["cytoplasm", "nucleus"]
        for im in coco["images"]:
            name = os.path.splitext(os.path.basename(im["file_name"]))[0]
            cyto, nuclei = cervical.read_staged(os.path.join(CERVICAL, "isbi2015"), name)
            anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
            assert (_decode(anns, 1) == cyto).all() and (_decode(anns, 2) == nuclei).all(), name
            overlapping += int((cyto.sum(0) > 1).sum())
            n_cyto, n_nuc = n_cyto + len(cyto), n_nuc + len(nuclei)
    assert (n_cyto, n_nuc) == (517, 510)
    assert overlapping > 0  # overlaps survive the conversion


def test_prepared_layout_ids_and_idempotence(prepared):
    out, prepare_cervical = prepared
    isbi = os.path.join(out, "isbi2015")
    loaded = {s: json.load(open(os.path.join(isbi, f"{s}.json"))) for s in ("train", "test", "unlabeled")}
    train_files = [im["file_name"] for im in loaded["train"]["images"]]
    assert train_files == [f"images/frame{i}.png" for i in ("004", "011", "013", "014", "016", "017")]
    assert [im["id"] for im in loaded["train"]["images"]] == [1, 2, 3, 4, 6, 7]
    assert [im["id"] for im in loaded["test"]["images"]] == [5, 8, 9, 10, 11, 12]
    unlabeled_files = [im["file_name"] for im in loaded["unlabeled"]["images"]]
    assert unlabeled_files == [f"unlabeled/EDF00{i}.png" for i in range(4)]
    assert [im["id"] for im in loaded["unlabeled"]["images"]] == [13, 14, 15, 16]
    assert loaded["unlabeled"]["annotations"] == []
    for coco in loaded.values():
        for im in coco["images"]:
            path = os.path.join(isbi, im["file_name"])
            assert os.path.isfile(path) and not os.path.islink(path)
    synth = json.load(open(os.path.join(out, "isbi2014_synth45", "train.json")))
    assert len(synth["images"]) == 45 and len(synth["annotations"]) == 270 * 2
    files = ("train.json", "test.json", "unlabeled.json")
    before = {p: open(os.path.join(isbi, p), "rb").read() for p in files}
    prepare_cervical.prepare_isbi2015(os.path.join(CERVICAL, "isbi2015"), isbi)  # second run: same bytes
    assert before == {p: open(os.path.join(isbi, p), "rb").read() for p in files}
