"""tools/dataset_stats.py: pixel mean/std, sizes and object sizes of a user's data set match direct figures."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from common import REPO
from detectron2.structures import polygons_to_bitmask
from user_data import write_user_dataset

from mmt_psm.instance.stats import suggest_anchor_sizes


def test_suggest_anchor_sizes():
    assert suggest_anchor_sizes([20.0] * 10) == [[16], [32], [64], [128], [256]]
    assert suggest_anchor_sizes([3.0, 40.0]) == [[8], [16], [32], [64], [128]]  # at least 8
    assert suggest_anchor_sizes([40.0] * 4, scale=0.5) == [[16], [32], [64], [128], [256]]


def test_dataset_stats_cli_on_user_data(tmp_path):
    paths = write_user_dataset(str(tmp_path / "data"), n_train=3, n_test=1, n_unlabeled=1)
    out = str(tmp_path / "stats.json")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "dataset_stats.py"), "--register",
                        f"st_train:{paths['train']}:{paths['image_root']}", "--format", "RGB",
                        "--min-size-train", "256", "--json", out], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MODEL.PIXEL_MEAN" in r.stdout and "MODEL.ANCHOR_GENERATOR.SIZES" in r.stdout
    with open(out) as f:
        s = json.load(f)
    imgs = np.stack([cv2.imread(p)[:, :, ::-1] for p in sorted(glob.glob(os.path.join(paths["image_root"],
                                                                                      "train_*.png")))])
    flat = imgs.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(s["pixel_mean"], flat.mean(0), atol=1e-3)  # RGB order
    np.testing.assert_allclose(s["pixel_std"], flat.std(0), atol=1e-3)
    assert s["num_images"] == 3 and s["height"] == {"min": 128, "median": 128.0, "max": 128}
    assert s["num_objects"] == 12 and s["objects_per_image"] == {"median": 4.0, "max": 4}
    with open(paths["train"]) as f:
        data = json.load(f)
    masks = [polygons_to_bitmask([np.asarray(a["segmentation"][0])], 128, 128) for a in data["annotations"]]
    sizes = [np.sqrt(m.sum()) for m in masks]  # rasterised polygon areas
    assert s["object_size"]["p50"] == pytest.approx(float(np.percentile(sizes, 50)))
    assert list(s["object_size_per_class"]) == ["cell"]
    assert s["resize_scale"] == pytest.approx(2.0)
    first = max(8, 2 ** int(np.floor(np.log2(np.percentile(sizes, 5) * 2.0))))
    assert s["anchor_sizes"] == [[first * 2**k] for k in range(5)]
