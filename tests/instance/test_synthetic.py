"""The synthetic overlapping-cell generator: determinism, mask sanity, and its COCO files."""
import importlib.util
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from common import REPO  # noqa: E402
from pycocotools.coco import COCO

from mmt_psm.instance.synthetic import generate_sample, image_id_for, sample_rng, write_synthetic_dataset


def test_same_seed_same_sample_different_seed_different_sample():
    a = generate_sample(np.random.default_rng(7), 96, 128)
    b = generate_sample(np.random.default_rng(7), 96, 128)
    c = generate_sample(np.random.default_rng(8), 96, 128)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.cytoplasm, b.cytoplasm)
    np.testing.assert_array_equal(a.nuclei, b.nuclei)
    assert not np.array_equal(a.image, c.image)


def test_shapes_counts_and_masks():
    overlapping_images = 0
    for seed in range(12):
        s = generate_sample(np.random.default_rng(seed), 128, 160)
        n = len(s.cytoplasm)
        assert s.image.shape == (128, 160) and s.image.dtype == np.uint8
        assert 2 <= n <= 8
        assert s.cytoplasm.shape == s.nuclei.shape == (n, 128, 160)
        assert s.cytoplasm.dtype == s.nuclei.dtype == bool
        assert s.cytoplasm.any(axis=(1, 2)).all() and s.nuclei.any(axis=(1, 2)).all()
        # Each nucleus lies inside its own cytoplasm.
        assert not (s.nuclei & ~s.cytoplasm).any()
        overlap = s.cytoplasm.sum(0) > 1
        overlapping_images += int(overlap.any())
        # Nuclei are darker than cytoplasm, cytoplasm darker than background (on average).
        background = ~s.cytoplasm.any(0)
        cyto_only = s.cytoplasm.any(0) & ~s.nuclei.any(0) & ~overlap
        nuclei = s.nuclei.any(0)
        assert s.image[nuclei].mean() < s.image[cyto_only].mean() < s.image[background].mean()
    assert overlapping_images >= 6


def test_overlaps_are_darker_than_single_cytoplasm():
    single, double = [], []
    for seed in range(12):
        s = generate_sample(np.random.default_rng(seed))
        depth = s.cytoplasm.sum(0)
        free = ~s.nuclei.any(0)
        single.append(s.image[(depth == 1) & free])
        double.append(s.image[(depth == 2) & free])
    assert np.concatenate(double).mean() < np.concatenate(single).mean() - 10


def test_per_image_seed_independent_of_split_sizes():
    a = generate_sample(sample_rng(0, "test", 3))
    b = generate_sample(sample_rng(0, "test", 3))
    np.testing.assert_array_equal(a.image, b.image)
    ids = {image_id_for(s, i) for s in ("train", "test", "unlabeled") for i in range(5)}
    assert len(ids) == 15


def test_written_dataset_loads_in_pycocotools_and_matches_generator(tmp_path):
    out = str(tmp_path / "syn")
    paths = write_synthetic_dataset(out, num_train=3, num_test=2, num_unlabeled=2, size=64, seed=5)
    assert set(paths) == {"train", "test", "unlabeled", "unlabeled_gt"}
    for split, count in (("train", 3), ("test", 2)):
        coco = COCO(paths[split])
        assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["cytoplasm", "nucleus"]
        assert len(coco.getImgIds()) == count
        for i in range(count):
            sample = generate_sample(sample_rng(5, split, i), 64, 64)
            img_id = image_id_for(split, i)
            info = coco.loadImgs(img_id)[0]
            assert (info["height"], info["width"]) == (64, 64)
            image = cv2.imread(os.path.join(out, "images", info["file_name"]), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(image, sample.image)
            for cat_id, expected in ((1, sample.cytoplasm), (2, sample.nuclei)):
                anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id], catIds=[cat_id]))
                decoded = np.stack([coco.annToMask(a).astype(bool) for a in anns])
                np.testing.assert_array_equal(decoded, expected)
                for a in anns:
                    assert a["area"] == float(mask_util.area(a["segmentation"]))
    with open(paths["unlabeled"]) as f:
        unlabeled = json.load(f)
    assert len(unlabeled["images"]) == 2 and unlabeled["annotations"] == []
    with open(paths["unlabeled_gt"]) as f:  # the same images, their labels held back for the monitor
        held_back = json.load(f)
    assert held_back["images"] == unlabeled["images"]
    assert {a["image_id"] for a in held_back["annotations"]} == {im["id"] for im in unlabeled["images"]}
    assert {a["category_id"] for a in held_back["annotations"]} == {1, 2}
    all_ann_ids = [a["id"] for a in COCO(paths["train"]).dataset["annotations"]]
    assert len(set(all_ann_ids)) == len(all_ann_ids)


@pytest.mark.slow
def test_hundred_images(tmp_path):
    """100 images at the quickstart size are written completely (no wall-clock bound: CI timings are noise)."""
    paths = write_synthetic_dataset(str(tmp_path), 50, 25, 25, size=256, seed=0)
    counts = {}
    for split, path in paths.items():
        with open(path) as f:
            counts[split] = len(json.load(f)["images"])
    assert counts == {"train": 50, "test": 25, "unlabeled": 25, "unlabeled_gt": 25}
    assert len(os.listdir(os.path.join(str(tmp_path), "images"))) == 100


def _load_prepare_script():
    spec = importlib.util.spec_from_file_location(
        "prepare_synthetic", os.path.join(REPO, "datasets", "prepare_synthetic.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_is_idempotent_and_rewrites_on_change(tmp_path):
    prep = _load_prepare_script()
    out = str(tmp_path / "synthetic")
    small = dict(num_train=2, num_test=1, num_unlabeled=1, size=64)
    assert prep.prepare_synthetic(out, **small) is True
    mtime = os.path.getmtime(os.path.join(out, "train.json"))
    assert prep.prepare_synthetic(out, **small) is False
    assert os.path.getmtime(os.path.join(out, "train.json")) == mtime
    small["num_train"] = 1  # fewer training images: rewritten, the stale PNG removed
    assert prep.prepare_synthetic(out, **small) is True
    assert sorted(os.listdir(os.path.join(out, "images"))) == ["test_0.png", "train_0.png", "unlabeled_0.png"]


def test_prepare_cli_defaults_to_detectron2_datasets(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "d2"))
    cmd = [sys.executable, os.path.join(REPO, "datasets", "prepare_synthetic.py"), "--num-train", "1",
           "--num-test", "1", "--num-unlabeled", "0", "--size", "32"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=str(tmp_path), env=env)
    assert "wrote" in run.stdout
    assert os.path.isfile(tmp_path / "d2" / "synthetic" / "train.json")
