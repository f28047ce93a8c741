"""tools/psm_pipeline.py end to end on two tiny synthetic H&E tiles (train_net.py runs in subprocesses), its
resumption, and the stage tool's handling of bad folders."""
from __future__ import annotations

import importlib.util
import json
import os

import cv2
import numpy as np
import pytest
from common import REPO
from psm_common import SCRATCH, write_tiles

from mmt_psm.nuclei.datasets import load_psm_index

TINY = SCRATCH + ["PSM.SELF_SUP.ITERS", "2", "PSM.SELF_SUP.CROP", "32", "PSM.SELF_SUP.BATCH", "2",
        "PSM.SELF_SUP.CHANNELS", "(4, 8)", "MODEL.UNET.CHANNELS", "(4, 8, 16)", "MODEL.UNET.DROPOUT", "(0.0, 0.0, 0.0)",
        "MODEL.SEM_SEG_HEAD.IN_FEATURES", '["res1", "res2", "res3"]', "INPUT.PSM_CROP_SIZE", "32",
        "SOLVER.IMS_PER_BATCH", "2", "SEMI.IMS_PER_BATCH_LABELED", "2", "SOLVER.WARMUP_ITERS", "0",
        "PSM.PSEUDO_MASK.KMEANS_SAMPLE", "2000"]


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pipeline_end_to_end_and_resume(tmp_path, capsys):
    images, gt = str(tmp_path / "tiles"), str(tmp_path / "gt")
    write_tiles(images, n=2, size=(64, 64), gt_folder=gt)
    out = str(tmp_path / "run")
    argv = ["--images", images, "--output", out, "--train-gt", gt, "--det-iters", "2", "--seg-iters", "2"] + TINY
    assert _tool("psm_pipeline").main(argv) == 0
    labels = os.path.join(out, "labels")
    index = json.load(open(os.path.join(labels, "index.json")))
    assert [r["stem"] for r in index["images"]] == ["tile0", "tile1"]
    assert all(r["pseudo_mask"] and r["voronoi"] and not r.get("instances") for r in index["images"])  # no GT
    for sub in ("activation", "pseudo", "probability", "voronoi"):
        expected = ["source.json"] if sub == "probability" else []  # what wrote the maps (below)
        assert sorted(os.listdir(os.path.join(labels, sub))) == expected + ["tile0.png", "tile1.png"]
    assert set(np.unique(cv2.imread(os.path.join(labels, "voronoi", "tile0.png"), -1))) <= {0, 1, 255}
    quality = json.load(open(os.path.join(labels, "label_quality.json")))
    assert {"pseudo_mask", "voronoi"} <= set(quality)
    pred = os.path.join(out, "predictions")
    inst = cv2.imread(os.path.join(pred, "instances", "tile0.png"), cv2.IMREAD_UNCHANGED)
    assert inst.dtype == np.uint16 and inst.shape == (64, 64)
    assert os.path.isfile(os.path.join(pred, "overlays", "tile1.png"))
    coco = json.load(open(os.path.join(pred, "predictions_coco.json")))
    assert all(d["category_id"] == 1 and 0 <= d["score"] <= 1 for d in coco)
    metrics = json.load(open(os.path.join(pred, "metrics.json")))  # --train-gt scores the default test set
    assert 0 <= metrics["full_image"]["AJI"] <= 1 and "AP" in metrics["full_image"]
    for stage in ("detection", "segmentation"):
        assert os.path.isfile(os.path.join(out, stage, "model_final.pth"))
    capsys.readouterr()
    assert _tool("psm_pipeline").main(argv) == 0  # a rerun resumes: nothing is recomputed or retrained
    log = capsys.readouterr().out
    assert "all activation maps exist" in log and log.count("training skipped") == 2
    assert "[psm stage 3] 1/2 tile0: exists, skipped" in log

    # probability maps remember what wrote them: predicting again with TTA redoes them instead of reusing the
    # single-view maps, and maps of unknown origin are refused
    weights = os.path.join(out, "segmentation", "model_final.pth")
    source = os.path.join(pred, "probability", "source.json")
    assert json.load(open(source)) == {"weights": os.path.abspath(weights), "bytes": os.path.getsize(weights),
                                       "mtime_ns": os.stat(weights).st_mtime_ns, "tta": True}  # segmentation.yaml
    assert json.load(open(os.path.join(labels, "probability", "source.json")))["tta"] is False  # stage 5: one view
    predict = ["predict", "--images", images, "--gt", gt, "--weights", weights, "--output", pred] + TINY
    _tool("psm_stage").run(predict + ["PSM.TEST.TTA", "False"])
    log = capsys.readouterr().out
    assert "predicting every image again" in log and "[psm predict] 1/2 tile0" in log
    assert json.load(open(source))["tta"] is False
    _tool("psm_stage").run(predict + ["PSM.TEST.TTA", "False"])
    assert "[psm predict]" not in capsys.readouterr().out  # same weights and setting: kept
    os.remove(source)
    with pytest.raises(FileExistsError, match=r"probability holds 2 probability maps but no source\.json"):
        _tool("psm_stage").run(predict)


def test_pipeline_with_refined_masks_trains_stage6_on_them(tmp_path, capsys):
    images, gt = str(tmp_path / "tiles"), str(tmp_path / "gt")
    write_tiles(images, n=2, size=(64, 64), gt_folder=gt)
    out = str(tmp_path / "run")
    base = ["--images", images, "--output", out, "--train-gt", gt, "--det-iters", "2", "--seg-iters", "2"] + TINY
    assert _tool("psm_pipeline").main(base + ["PSM.REFINE.ENABLED", "True"]) == 0
    labels = os.path.join(out, "labels")
    index = json.load(open(os.path.join(labels, "index.json")))
    assert [r["pseudo_mask"] for r in index["images"]] == ["refined/tile0.png", "refined/tile1.png"]
    # and the stage-6 loader hands those files to the segmentor as its pseudo-mask target
    assert [d["sem_seg_file_name"] for d in load_psm_index(labels)] == [
        os.path.join(labels, "refined", f"tile{i}.png") for i in (0, 1)]
    for stem in ("tile0", "tile1"):  # the band of the detection network's probability, pixel for pixel
        prob = cv2.imread(os.path.join(labels, "probability", stem + ".png"), -1) / 255.0
        ref = cv2.imread(os.path.join(labels, "refined", stem + ".png"), -1)
        assert np.array_equal(ref == 1, prob >= 0.7) and np.array_equal(ref == 0, prob <= 0.3)
        assert np.all(ref[(prob > 0.3) & (prob < 0.7)] == 255)
    quality = json.load(open(os.path.join(labels, "label_quality.json")))
    assert {"pseudo_mask", "voronoi", "refined_mask"} <= set(quality)
    assert "stage 5 (points, Voronoi labels, refined masks)" in capsys.readouterr().out
    seg = os.path.join(out, "segmentation", "model_final.pth")
    os.remove(seg)  # retraining stage 6 without the switch would silently use the refined masks: refused
    with pytest.raises(ValueError, match="refined pseudo masks .* PSM.REFINE.ENABLED True"):
        _tool("psm_pipeline").main(base)
    assert not os.path.isfile(seg)


def test_stage_tool_bad_inputs(tmp_path):
    stage = _tool("psm_stage")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        stage.run(["activation", "--images", str(tmp_path / "empty"), "--labels", str(tmp_path / "l")] + TINY)
    bad = tmp_path / "bad"
    write_tiles(str(bad), n=1, size=(32, 32))
    (bad / "corrupt.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(OSError, match="corrupt.png"):
        stage.run(["activation", "--images", str(bad), "--labels", str(tmp_path / "l")] + TINY)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a registered data set"):
        stage.run(["activation", "--images", "no_such_set", "--labels", str(tmp_path / "l")] + TINY)


def test_blank_tile_gets_empty_pseudo_mask_with_warning(tmp_path, capsys):
    folder = tmp_path / "tiles"
    write_tiles(str(folder), n=1, size=(48, 48))
    cv2.imwrite(str(folder / "blank.png"), np.full((48, 48, 3), 240, np.uint8))
    labels = str(tmp_path / "labels")
    stage = _tool("psm_stage")
    stage.run(["activation", "--images", str(folder), "--labels", labels] + TINY)
    stage.run(["pseudo-masks", "--images", str(folder), "--labels", labels] + TINY)
    assert "blank.png has no foreground" in capsys.readouterr().out
    assert cv2.imread(os.path.join(labels, "pseudo", "blank.png"), -1).sum() == 0


def test_training_stages_launch_on_num_gpus_with_the_label_folder_in_the_environment(tmp_path, monkeypatch):
    """--num-gpus reaches train_net's launch (one process per GPU); the processes it spawns find the label
    folder through MMT_PSM_LABEL_SETS, which is restored afterwards."""
    tool = _tool("psm_pipeline")
    calls = []

    def fake_launch(main, num_gpus, **kw):
        calls.append((num_gpus, kw["args"][0].num_gpus, os.environ.get("MMT_PSM_LABEL_SETS")))

    monkeypatch.setattr(tool, "launch", fake_launch)
    monkeypatch.setenv("MMT_PSM_LABEL_SETS", "other=/elsewhere")
    labels = str(tmp_path / "labels")
    tool.train("detection.yaml", str(tmp_path / "det"), labels, 2, [], num_gpus=2)
    assert calls == [(2, 2, os.pathsep.join(["other=/elsewhere", f"psm_labels={labels}"]))]
    assert os.environ["MMT_PSM_LABEL_SETS"] == "other=/elsewhere"
    with pytest.raises(SystemExit):  # the flag exists and takes an int
        tool.main(["--images", "x", "--output", "y", "--num-gpus", "two"])
