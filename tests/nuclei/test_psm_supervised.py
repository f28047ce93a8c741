"""Supervised upper bound of PSM: ``psm_stage.py supervised-labels`` (GT instance maps -> the label folder stage 6
trains on) and ``psm_pipeline.py --supervised``, on tiny synthetic tiles with known answers."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch
from common import REPO
from psm_common import he_tile
from test_psm_pipeline import TINY, _tool

from mmt_psm.config import load_config
from mmt_psm.nuclei.pipeline.ground_truth import supervised_labels
from mmt_psm.nuclei.pipeline.label_files import GT_MARKER

SEG_CFG = os.path.join(REPO, "configs", "psm", "segmentation.yaml")


def test_supervised_labels_hand_checked():
    inst = np.array([[0, 0, 0, 0, 0, 0],
                     [0, 1, 1, 2, 2, 0],
                     [0, 1, 1, 2, 2, 0],
                     [0, 0, 0, 0, 0, 0],
                     [3, 3, 0, 0, 0, 0]], np.uint16)
    pseudo, voronoi = supervised_labels(inst)
    assert pseudo.dtype == np.uint8 and voronoi.dtype == np.uint8
    np.testing.assert_array_equal(pseudo, [[0, 0, 0, 0, 0, 0],
                                           [0, 1, 1, 1, 1, 0],
                                           [0, 1, 1, 1, 1, 0],
                                           [0, 0, 0, 0, 0, 0],
                                           [1, 1, 0, 0, 0, 0]])
    # nuclei 1 and 2 touch: a 2-pixel background band between them, as between Voronoi cells; no 255 anywhere
    np.testing.assert_array_equal(voronoi, [[0, 0, 0, 0, 0, 0],
                                            [0, 1, 0, 0, 1, 0],
                                            [0, 1, 0, 0, 1, 0],
                                            [0, 0, 0, 0, 0, 0],
                                            [1, 1, 0, 0, 0, 0]])


def _gt_folder(tmp_path):
    """Tiles tile0, tile1 (separate nuclei) and touch (two touching nuclei) with their instance maps."""
    images, gt = tmp_path / "tiles", tmp_path / "gt"
    images.mkdir()
    gt.mkdir()
    for stem, centres in (("tile0", ((12, 12), (12, 36), (36, 24))), ("tile1", ((14, 30), (34, 12))),
                          ("touch", ((24, 16), (24, 32)))):
        img, inst = he_tile((48, 48), centres, radius=8)
        cv2.imwrite(str(images / f"{stem}.png"), img[:, :, ::-1])
        cv2.imwrite(str(gt / f"{stem}.png"), inst)
    return str(images), str(gt)


def test_stage_writes_gt_foreground_and_loads_through_stage6_mapper(tmp_path, capsys):
    images, gt = _gt_folder(tmp_path)
    labels = str(tmp_path / "labels_gt")
    stage = _tool("psm_stage")
    assert stage.run(["supervised-labels", "--images", images, "--gt", gt, "--labels", labels]) == 0
    index = json.load(open(os.path.join(labels, "index.json")))
    assert [r["stem"] for r in index["images"]] == ["tile0", "tile1", "touch"]
    assert all(r["pseudo_mask"] and r["voronoi"] for r in index["images"])
    assert os.path.isfile(os.path.join(labels, GT_MARKER))
    for stem in ("tile0", "tile1", "touch"):
        fg = (cv2.imread(os.path.join(gt, stem + ".png"), cv2.IMREAD_UNCHANGED) > 0).astype(np.uint8)
        pseudo = cv2.imread(os.path.join(labels, "pseudo", stem + ".png"), cv2.IMREAD_UNCHANGED)
        voronoi = cv2.imread(os.path.join(labels, "voronoi", stem + ".png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(pseudo, fg)
        if stem != "touch":  # separate nuclei: the Voronoi-format labels are the GT foreground too
            np.testing.assert_array_equal(voronoi, fg)
    # touching pair: only the 2-pixel band at the contact is turned to background
    assert 0 < int(pseudo.sum()) - int(voronoi.sum()) <= 2 * 48 and set(np.unique(voronoi)) == {0, 1}
    assert voronoi[24, 16] == 1 and voronoi[24, 32] == 1 and voronoi[24, 23:25].tolist() == [0, 0]
    capsys.readouterr()
    stage.run(["supervised-labels", "--images", images, "--gt", gt, "--labels", labels])  # resumes
    assert "3/3 touch: exists, skipped" in capsys.readouterr().out

    # the data set and mapper stage 6 trains with, and one training step of its model
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from mmt_psm.nuclei.datasets import register_psm_labels
    from mmt_psm.nuclei.mapper import PSMNucleiMapper

    dicts = DatasetCatalog.get(register_psm_labels("psm_supervised_test", labels))
    assert all("instance_file_name" not in d for d in dicts)
    cfg = load_config(SEG_CFG, TINY + ["INPUT.PSM_CROP_SIZE", "0"], freeze=True)
    assert cfg.MODEL.PSM.VORONOI_WEIGHT > 0  # stage 6 reads both maps
    d = PSMNucleiMapper(cfg, is_train=True)(dicts[2])
    fg = (cv2.imread(os.path.join(gt, "touch.png"), cv2.IMREAD_UNCHANGED) > 0)
    assert d["sem_seg"].shape == (48, 48) and int(d["sem_seg"].sum()) == int(fg.sum())  # rot/flip keep the count
    assert set(d["voronoi"].unique().tolist()) == {0, 1}  # every pixel labelled
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with EventStorage():
        losses = model([d])
    assert {"loss_pseudo", "loss_voronoi"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())


def test_bad_inputs_name_the_file(tmp_path):
    images, gt = _gt_folder(tmp_path)
    stage = _tool("psm_stage")
    os.remove(os.path.join(gt, "tile1.png"))
    with pytest.raises(FileNotFoundError, match=r"gt/tile1\.png for image .*tiles/tile1\.png"):
        stage.run(["supervised-labels", "--images", images, "--gt", gt, "--labels", str(tmp_path / "a")])
    cv2.imwrite(os.path.join(gt, "tile1.png"), np.zeros((40, 48), np.uint16))
    with pytest.raises(ValueError, match=r"gt/tile1\.png has size \(40, 48\), its image .*tile1\.png"):
        stage.run(["supervised-labels", "--images", images, "--gt", gt, "--labels", str(tmp_path / "b")])
    # a ground-truth folder and a label-free one never mix, either way round
    cv2.imwrite(os.path.join(gt, "tile1.png"), np.zeros((48, 48), np.uint16))
    stage.run(["supervised-labels", "--images", images, "--gt", gt, "--labels", str(tmp_path / "c")])
    with pytest.raises(ValueError, match="holds ground-truth labels"):
        stage.run(["activation", "--images", images, "--labels", str(tmp_path / "c")] + TINY)
    os.makedirs(tmp_path / "d" / "activation")
    with pytest.raises(ValueError, match="label-free PSM label folder"):
        stage.run(["supervised-labels", "--images", images, "--gt", gt, "--labels", str(tmp_path / "d")])


def test_pipeline_supervised(tmp_path, capsys):
    images, gt = _gt_folder(tmp_path)
    pipeline = _tool("psm_pipeline")
    with pytest.raises(SystemExit):
        pipeline.main(["--supervised", "--images", images, "--output", str(tmp_path / "x")])
    assert "--supervised needs --train-gt" in capsys.readouterr().err
    out = str(tmp_path / "sup")
    argv = ["--supervised", "--images", images, "--train-gt", gt, "--output", out, "--det-iters", "2",
            "--seg-iters", "2"] + TINY
    assert pipeline.main(argv) == 0  # PSM's chain: stage 4 then stage 6 initialised from it, on GT labels
    log = capsys.readouterr().out
    assert "supervised labels (ground truth) done" in log and "stage 4 (detection network) done" in log
    assert "Voronoi labels) done" not in log and "[psm stage 3]" not in log
    assert not os.path.isdir(os.path.join(out, "labels", "activation"))  # no label-free stage ran
    for stage in ("detection", "segmentation"):
        assert os.path.isfile(os.path.join(out, stage, "model_final.pth"))
    metrics = json.load(open(os.path.join(out, "predictions", "metrics.json")))  # scored on the training GT
    assert 0 <= metrics["full_image"]["AJI"] <= 1
    scratch = str(tmp_path / "scratch")
    assert pipeline.main(argv[:6] + [scratch, "--seg-from-scratch", "--seg-iters", "2"] + TINY) == 0
    assert not os.path.isdir(os.path.join(scratch, "detection"))  # stage 6 alone
    assert os.path.isfile(os.path.join(scratch, "predictions", "metrics.json"))
