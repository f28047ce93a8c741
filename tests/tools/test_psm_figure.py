"""tools/psm_figure.py: prediction | ground-truth contour figures of PSM outputs."""
from __future__ import annotations

import importlib.util
import json
import os

import cv2
import numpy as np
import pytest
from common import REPO
from psm_common import write_tiles


def _tool():
    spec = importlib.util.spec_from_file_location("psm_figure", os.path.join(REPO, "tools", "psm_figure.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_figure_puts_prediction_left_and_ground_truth_right(tmp_path):
    tool = _tool()
    images, gt, pred = tmp_path / "tiles", tmp_path / "gt", tmp_path / "pred"
    write_tiles(str(images), n=1, size=(96, 96), gt_folder=str(gt))
    (pred / "instances").mkdir(parents=True)
    square = np.zeros((96, 96), np.uint16)  # one predicted nucleus, a square in the crop: its outline in yellow
    square[40:50, 40:50] = 1
    cv2.imwrite(str(pred / "instances" / "tile0.png"), square)
    (pred / "metrics.json").write_text(json.dumps({"per_image": [{"stem": "tile0", "AJI": 0.25}]}))
    out = tmp_path / "fig"
    assert tool.main(["--pred", str(pred), "--images", str(images), "--gt", str(gt), "--stems", "tile0",
                      "--crop", "64", "--output", str(out)]) == 0
    fig = cv2.imread(str(out / "tile0.png"))
    assert fig.shape == (24 + 64, 64 + 4 + 64, 3)
    left, right = fig[24:, :64], fig[24:, 68:]
    yellow = np.all(left == tool.PRED_BGR, axis=-1)
    ring = np.zeros((64, 64), bool)  # the square's inner boundary, in crop coordinates (offset 16)
    ring[24:34, 24:34] = True
    ring[25:33, 25:33] = False
    assert np.array_equal(yellow, ring)
    assert not np.all(right == tool.PRED_BGR, axis=-1).any()  # the prediction is not drawn on the right
    assert np.all(right == tool.GT_BGR, axis=-1).sum() > 20  # the crop holds ground-truth nuclei
    assert np.all(fig[24:, 64:68] == 255)  # the white gap
    assert tool.per_image_aji(str(pred)) == {"tile0": 0.25}
    # the whole image where it is smaller than the crop; the centre window otherwise
    a = np.arange(100).reshape(10, 10)
    assert tool.centre_crop(a, 20).shape == (10, 10) and tool.centre_crop(a, 4)[0, 0] == a[3, 3]
    with pytest.raises(FileNotFoundError, match="no image with instance labels named nope"):
        tool.main(["--pred", str(pred), "--images", str(images), "--gt", str(gt), "--stems", "nope",
                   "--output", str(out)])
    with pytest.raises(ValueError, match="differ"):
        tool.figure(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), np.zeros((9, 8)), 4)
