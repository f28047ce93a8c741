"""One task's library missing never stops another task: with medpy, h5py, scikit-learn and scikit-image
unimportable, ``import mmt_psm`` and a Mask R-CNN still work, and each task that needs one of them raises an
ImportError naming the package and the task."""
from __future__ import annotations

import os
import subprocess
import sys

from common import REPO

CODE = r"""
import sys
for name in ("medpy", "h5py", "sklearn", "skimage"):
    sys.modules[name] = None  # 'import name' (and its submodules) raises ImportError
import numpy as np
import torch
import mmt_psm
from detectron2.modeling import build_model
from mmt_psm.config import load_config

cfg = load_config("configs/quickstart/supervised.yaml", ["MODEL.DEVICE", "cpu"])
model = build_model(cfg).eval()
with torch.no_grad():
    out = model([{"image": torch.zeros(3, 64, 64), "height": 64, "width": 64}])
print("MASK_RCNN_OK", type(model).__name__, len(out))

def error_of(fn, *args):
    try:
        fn(*args)
    except ImportError as e:
        return str(e).replace("\n", " ")
    return "no error"

from mmt_psm.semantic.volume_metrics import dice_hd95
from mmt_psm.semantic.acdc import read_slice
from mmt_psm.nuclei.pseudo_masks import remove_small
from mmt_psm.nuclei.haematoxylin import haematoxylin_density
print("MEDPY", error_of(dice_hd95, np.ones((2, 4, 4)), np.ones((2, 4, 4))))
print("H5PY", error_of(read_slice, "missing.h5"))
print("SKIMAGE", error_of(remove_small, np.ones((8, 8), bool), 2, 2))
print("SKIMAGE_COLOR", error_of(haematoxylin_density, np.zeros((4, 4, 3), np.uint8)))
from mmt_psm.nuclei.pseudo_masks import pseudo_mask
print("SKLEARN", error_of(pseudo_mask, np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), 2, 1.0, 0, 0, 64))
"""


def test_task_libraries_are_optional_for_the_other_tasks():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    assert lines["MASK_RCNN_OK"] == "GeneralizedRCNN 1"
    for key, package, task in (("MEDPY", "'medpy'", "ACDC volume metrics"), ("H5PY", "'h5py'", "ACDC"),
                               ("SKIMAGE", "'scikit-image'", "PSM nuclei"),
                               ("SKIMAGE_COLOR", "'scikit-image'", "PSM nuclei"),
                               ("SKLEARN", "'scikit-learn'", "PSM nuclei")):
        assert package in lines[key] and task in lines[key] and "pip install" in lines[key], (key, lines[key])
