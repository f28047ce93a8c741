"""The pure-Python Detectron2 build made by tools/install_detectron2.py: each compatibility patch works."""
import importlib.util
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from common import REPO

PURE = importlib.util.find_spec("detectron2.utils._compiled_ops") is not None
pure_only = pytest.mark.skipif(not PURE, reason="detectron2 is a compiled build (installer route existing/github)")
sys.path.insert(0, os.path.join(REPO, "tools"))
import install_detectron2  # noqa: E402


@pure_only
def test_pillow10_extent_transform_default_interp():
    from detectron2.data.transforms import ExtentTransform

    out = ExtentTransform((0, 0, 8, 8), (4, 4)).apply_image(np.zeros((8, 8, 3), np.uint8))
    assert out.shape == (4, 4, 3)


@pure_only
def test_model_zoo_config_without_pkg_resources():
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    assert os.path.isfile(path)


@pure_only
def test_compiled_only_op_names_itself_and_the_fix():
    from detectron2.layers import ROIAlignRotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    with pytest.raises(RuntimeError, match=r"box_iou_rotated(.|\n)*compiled(.|\n)*github.com/facebookresearch"):
        pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))
    with pytest.raises(RuntimeError, match="roi_align_rotated_forward"):
        ROIAlignRotated((2, 2), 1.0, 0)(torch.zeros(1, 1, 4, 4), torch.zeros(1, 6))


@pure_only
def test_coco_evaluator_falls_back_to_pycocotools(tmp_path):
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import COCOEvaluator

    MetadataCatalog.get("d2_fallback_probe").set(json_file=str(tmp_path / "x.json"))
    (tmp_path / "x.json").write_text('{"images": [], "annotations": [], "categories": []}')
    assert COCOEvaluator("d2_fallback_probe", output_dir=str(tmp_path))._use_fast_impl is False


@pure_only
def test_map_dataset_fallback_on_python311():
    from detectron2.data.common import MapDataset

    ds = MapDataset(list(range(4)), lambda x: None if x == 0 else x)
    assert ds[0] in (1, 2, 3)


@pure_only
def test_numpy_aliases_gone():
    from detectron2.structures.masks import polygons_to_bitmask

    m = polygons_to_bitmask([np.array([0, 0, 4, 0, 4, 4, 0, 4], dtype=float)], 6, 6)
    assert m.dtype == bool and m.sum() > 0


@pure_only
def test_collect_env_runs_without_mmt_psm():
    r = subprocess.run([sys.executable, "-m", "detectron2.utils.collect_env"], capture_output=True, text=True,
                       cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "detectron2._C" in r.stdout and "not built" in r.stdout


def test_patches_apply_to_the_sdist_and_are_idempotent(tmp_path):
    sdist = os.path.join(REPO, "build", "cache", "pb1-detectron2-0.6.tar.gz")
    if not os.path.exists(sdist):
        pytest.skip(f"{sdist} absent (installer took another route)")
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp_path, filter="data")
    src = str(tmp_path / "pb1-detectron2-0.6")
    names = install_detectron2.apply_patches(src)
    assert names == list(install_detectron2.PATCHES)
    install_detectron2.apply_patches(src)  # a second run changes nothing and does not fail
    with open(os.path.join(src, "detectron2", "data", "transforms", "transform.py")) as f:
        assert "Image.LINEAR" not in f.read()
    with open(os.path.join(src, "setup.py")) as f:
        setup_py = f.read()
    assert "import torch" not in setup_py and "ext_modules" not in setup_py and 'name="detectron2"' in setup_py


def test_patch_reports_a_missing_target(tmp_path):
    (tmp_path / "a.py").write_text("nothing here\n")
    with pytest.raises(RuntimeError, match="patch target not found"):
        install_detectron2._sub("a.py", "old", "new")(str(tmp_path))
