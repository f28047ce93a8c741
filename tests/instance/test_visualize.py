"""Pseudo-label hook (period, staleness, 0 and 2 pseudo-labels), dataset GT | prediction drawing, and the
tools/visualize.py CLI (folder input with a 16-bit PNG; a registered data set with --which)."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("detectron2")
import cv2  # noqa: E402
import torch  # noqa: E402
from common import REPO  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import mmt_psm  # noqa: E402, F401  (registers data sets and models)
from mmt_psm.config import add_mmt_psm_config  # noqa: E402
from mmt_psm.core import Trainer  # noqa: E402
from mmt_psm.instance.datasets import register_cell_coco  # noqa: E402
from mmt_psm.instance.synthetic import write_synthetic_dataset  # noqa: E402
from mmt_psm.instance.vis_hook import PseudoLabelVisHook  # noqa: E402
from mmt_psm.instance.visualize import draw_dataset_predictions  # noqa: E402

QUICK = os.path.join(REPO, "configs", "quickstart")
FAST = [  # random weights and a busy CPU: keep inference small
    "TEST.DETECTIONS_PER_IMAGE", "5", "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
]
H, W = 40, 56


def _cfg(name: str, opts=()):
    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    cfg.merge_from_file(os.path.join(QUICK, name))
    cfg.merge_from_list(FAST + list(opts))
    return cfg


# ---------------------------------------------------------------------------------------------------- hook
def _pseudo(n_dets: int, n_images: int = 2):
    """(unlabeled dicts, detections) as MMTPSMRCNN stores them in ``_last_pseudo``."""
    g = torch.Generator().manual_seed(0)
    dicts, dets = [], []
    for _ in range(n_images):
        view = torch.randint(150, 230, (3, H, W), dtype=torch.uint8, generator=g)
        dicts.append({"teacher_views": [view, view.flip(-1)], "image_id": 1})
        inst = Instances((H, W))
        boxes = torch.tensor([[4.0, 4.0, 24.0, 30.0], [30.0, 10.0, 50.0, 36.0]][:n_dets])
        inst.pred_boxes = Boxes(boxes.reshape(-1, 4))
        inst.pred_classes = torch.tensor([0, 1][:n_dets], dtype=torch.int64)
        inst.scores = torch.tensor([0.9, 0.6][:n_dets])
        inst.pred_masks = torch.full((n_dets, 1, 28, 28), 0.8)
        dets.append(inst)
    return dicts, dets


def _run_hook(hook, model, iters, unsup_iters, pseudo):
    """Drive the hook like TrainerBase.train; the model 'stores' pseudo-labels on ``unsup_iters`` only."""
    trainer = SimpleNamespace(iter=0, model=model, cfg=_cfg("mmt_psm.yaml"))
    hook.trainer = trainer
    with EventStorage(0) as storage:
        trainer.storage = storage
        hook.before_train()
        for it in iters:
            trainer.iter = storage.iter = it
            hook.before_step()
            if it in unsup_iters:
                model._last_pseudo = pseudo
            hook.after_step()
        return storage


def test_hook_writes_fresh_pseudo_labels_at_period(tmp_path):
    model = torch.nn.Module()
    hook = PseudoLabelVisHook(5, str(tmp_path))
    # unsupervised step at 3 (stale by iteration 4, which has none), then every step from 6 on
    rng_before = np.random.get_state()[1].copy()
    storage = _run_hook(hook, model, range(10), {3, 6, 7, 8, 9}, _pseudo(2))
    assert (np.random.get_state()[1] == rng_before).all()  # drawing leaves training's RNG untouched
    assert sorted(os.listdir(tmp_path / "pseudo_labels")) == ["iter_0000009.png"]
    img = cv2.imread(str(tmp_path / "pseudo_labels" / "iter_0000009.png"))
    assert img.shape == (H, 2 * W, 3)  # view 0 of the first two unlabeled images, side by side
    (name, tb_img, it), = storage._vis_data
    assert name == "pseudo_labels" and it == 9
    assert tb_img.shape == (3, H, 2 * W) and tb_img.dtype == np.float32 and 0.0 <= tb_img.min() <= tb_img.max() <= 1
    assert model._last_pseudo is None  # the drawn batch is not kept alive
    # the pasted masks are drawn: pixels inside the first box change (BGR view -> RGB drawing)
    view0 = _pseudo(2)[0][0]["teacher_views"][0].permute(1, 2, 0).numpy()
    assert np.abs(img[12:26, 8:20].astype(int) - view0[12:26, 8:20].astype(int)).mean() > 5


def test_hook_zero_pseudo_labels_still_writes_unannotated_image(tmp_path):
    model = torch.nn.Module()
    hook = PseudoLabelVisHook(2, str(tmp_path), max_images=1)
    storage = _run_hook(hook, model, range(2), {1}, _pseudo(0))
    img = cv2.imread(str(tmp_path / "pseudo_labels" / "iter_0000001.png"))
    assert img.shape == (H, W, 3)
    view0 = _pseudo(0)[0][0]["teacher_views"][0].permute(1, 2, 0).numpy()  # BGR, as written by cv2
    assert (img[H // 2 :] == view0[H // 2 :]).all()  # nothing drawn but the title
    assert (img[:10] != view0[:10]).any()  # the "0 pseudo-labels" title
    assert len(storage._vis_data) == 1


# ---------------------------------------------------------------------------------------------------- drawing
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Two 64x64 synthetic test images registered as ``vis_synth_test``."""
    root = str(tmp_path_factory.mktemp("synth"))
    paths = write_synthetic_dataset(root, num_train=1, num_test=2, num_unlabeled=0, size=64, seed=3)
    register_cell_coco("vis_synth_test", paths["test"], os.path.join(root, "images"), "test fixture")
    return "vis_synth_test"


def test_draw_dataset_predictions_side_by_side(synth, tmp_path):
    torch.manual_seed(0)
    cfg = _cfg("mmt_psm.yaml")
    model = Trainer.build_model(cfg)
    model.train()
    with model.evaluate_with("student"):
        paths = draw_dataset_predictions(cfg, model, synth, str(tmp_path / "vis"), 5, score_thresh=0.0)
    assert len(paths) == 2 and all(p.endswith("_gt_pred.png") for p in paths)
    assert [cv2.imread(p).shape for p in paths] == [(64, 128, 3)] * 2  # GT | prediction at the image size
    assert model.training and not model.teacher.training  # mode restored


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory):
    """OUTPUT_DIR holding model_final.pth of a randomly initialised plain GeneralizedRCNN."""
    out = tmp_path_factory.mktemp("supervised_run")
    torch.manual_seed(0)
    model = Trainer.build_model(_cfg("supervised.yaml"))
    assert type(model).__name__ == "GeneralizedRCNN"
    DetectionCheckpointer(model, save_dir=str(out)).save("model_final")
    return out


def test_cli_input_folder_with_16bit_png(supervised_run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.random.default_rng(0).integers(0, 255, (48, 64), dtype=np.uint8))
    cv2.imwrite(str(images / "b16.png"), np.random.default_rng(1).integers(0, 4095, (40, 72), dtype=np.uint16))
    out = tmp_path / "vis"
    cmd = [sys.executable, os.path.join(REPO, "tools", "visualize.py"),
           "--config-file", os.path.join(QUICK, "supervised.yaml"), "--output", str(out), "--score-thresh", "0.0",
           "--input", str(images), "OUTPUT_DIR", str(supervised_run)] + FAST  # weights: OUTPUT_DIR/model_final.pth
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["a_pred.png", "b16_pred.png"]
    assert cv2.imread(str(out / "a_pred.png")).shape == (48, 64, 3)
    assert cv2.imread(str(out / "b16_pred.png")).shape == (40, 72, 3)


def test_cli_dataset_with_teacher_student_checkpoint(synth, tmp_path):
    import importlib.util

    torch.manual_seed(0)
    model = Trainer.build_model(_cfg("mmt_psm.yaml"))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("mmt")
    spec = importlib.util.spec_from_file_location("visualize_cli", os.path.join(REPO, "tools", "visualize.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    paths = cli.main(["--config-file", os.path.join(QUICK, "mmt_psm.yaml"), "--dataset", synth,
                      "--output", str(tmp_path / "vis"), "--weights", str(tmp_path / "mmt.pth"),
                      "--which", "student", "--max-images", "1"] + FAST)
    assert len(paths) == 1 and cv2.imread(paths[0]).shape == (64, 128, 3)
    with pytest.raises(SystemExit, match="checkpoint not found"):
        cli.main(["--config-file", os.path.join(QUICK, "mmt_psm.yaml"), "--dataset", synth,
                  "--output", str(tmp_path / "vis2"), "OUTPUT_DIR", str(tmp_path / "nowhere")])


def test_weights_prefer_the_runs_final_model_over_the_configs_start(tmp_path):
    """A run's config.yaml names its start (e.g. ImageNet weights) as MODEL.WEIGHTS: without --weights or a
    MODEL.WEIGHTS override the tool draws OUTPUT_DIR/model_final.pth when it exists."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("visualize_tool", os.path.join(REPO, "tools", "visualize.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    start, final = str(tmp_path / "imagenet.pth"), tmp_path / "model_final.pth"
    assert tool.resolve_weights("", False, start, str(tmp_path)) == start  # no trained model yet
    final.write_bytes(b"")
    assert tool.resolve_weights("", False, start, str(tmp_path)) == str(final)
    assert tool.resolve_weights("", True, start, str(tmp_path)) == start  # MODEL.WEIGHTS on the command line
    assert tool.resolve_weights("x.pth", False, start, str(tmp_path)) == "x.pth"
    assert tool.resolve_weights("", False, "", str(tmp_path / "none")) == str(tmp_path / "none" / "model_final.pth")
