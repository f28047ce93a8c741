"""PSM stage 3's haematoxylin option (``PSM.PSEUDO_MASK.METHOD "haematoxylin"``) on tiles with known nuclei."""
from __future__ import annotations

import logging
import os

import cv2
import numpy as np
import pytest
from psm_common import he_tile, write_tiles
from skimage.color import rgb2hed

from mmt_psm.config import load_config
from mmt_psm.nuclei.haematoxylin import haematoxylin_density, haematoxylin_mask
from mmt_psm.nuclei.pipeline.label_files import resolve_images, write_unit_map
from mmt_psm.nuclei.pipeline.stages import run_pseudo_masks
from mmt_psm.nuclei.pseudo_masks import pseudo_mask

CENTRES = ((20, 20), (20, 70), (70, 45))


def _precision_recall(mask: np.ndarray, gt: np.ndarray) -> tuple:
    inter = float((mask.astype(bool) & gt).sum())
    return inter / max(mask.sum(), 1), inter / gt.sum()


def test_density_is_the_deconvolved_haematoxylin_channel_and_higher_on_nuclei():
    img, inst = he_tile((96, 96), CENTRES, radius=9)
    h = haematoxylin_density(img)
    np.testing.assert_allclose(h, rgb2hed(img)[:, :, 0], rtol=1e-5, atol=1e-6)
    assert h[inst > 0].mean() > h[inst == 0].mean() + 0.05  # purple nuclei hold the stain, pink stroma does not
    with pytest.raises(ValueError, match="HxWx3"):
        haematoxylin_density(img[:, :, 0])


def test_haematoxylin_mask_finds_known_nuclei_and_drops_specks():
    img, inst = he_tile((96, 96), CENTRES, radius=9)
    act = np.zeros((96, 96), np.float32)
    mask = haematoxylin_mask(img, act, sigma=0.0, act_weight=0.0, min_object_size=20)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    precision, recall = _precision_recall(mask, inst > 0)
    assert precision > 0.95 and recall > 0.95
    speck = img.copy()
    speck[50:52, 5:7] = (80, 45, 135)  # a 4-pixel nucleus-coloured speck is removed as a small object
    assert haematoxylin_mask(speck, act, sigma=0.0, act_weight=0.0, min_object_size=20)[50:52, 5:7].sum() == 0


def test_activation_weight_adds_the_activation_before_the_threshold():
    img, inst = he_tile((96, 96), CENTRES, radius=9)
    flat = np.zeros((96, 96), np.float32)
    base = haematoxylin_mask(img, flat, sigma=1.0, act_weight=0.0)
    assert np.array_equal(base, haematoxylin_mask(img, np.ones_like(flat), sigma=1.0, act_weight=0.0))
    halo = np.zeros_like(flat)  # activation on a ring just outside the first nucleus grows that nucleus only
    yy, xx = np.mgrid[:96, :96]
    ring = ((yy - 20) ** 2 + (xx - 20) ** 2 > 81) & ((yy - 20) ** 2 + (xx - 20) ** 2 <= 144)
    halo[ring] = 1.0
    grown = haematoxylin_mask(img, halo, sigma=1.0, act_weight=2.0)
    assert grown[ring].mean() > base[ring].mean() + 0.5
    # far from the ring only Otsu's (global) threshold moves: the third nucleus keeps nearly every pixel
    assert (grown[50:, :] == base[50:, :]).mean() > 0.98


def test_blank_tile_is_empty_with_warning_and_shapes_are_checked(caplog):
    blank = np.full((32, 32, 3), 230, np.uint8)
    with caplog.at_level(logging.WARNING):
        assert haematoxylin_mask(blank, np.zeros((32, 32), np.float32)).sum() == 0
    assert "stain range" in caplog.text
    with pytest.raises(ValueError, match="differ in size"):
        haematoxylin_mask(blank, np.zeros((16, 32), np.float32))
    with pytest.raises(ValueError, match="must be >= 0"):
        haematoxylin_mask(blank, np.zeros((32, 32), np.float32), sigma=-1.0)


def test_stage3_tool_switches_method_by_config(tmp_path):
    write_tiles(str(tmp_path / "img"), n=2, gt_folder=str(tmp_path / "gt"))
    images = resolve_images(str(tmp_path / "img"), str(tmp_path / "gt"))
    zero = np.zeros((96, 96), np.float32)
    cfgs = {"haematoxylin": load_config("configs/psm/detection.yaml", freeze=True),  # the config's method
            "kmeans": load_config("configs/psm/detection.yaml", ["PSM.PSEUDO_MASK.METHOD", "kmeans"], freeze=True)}
    assert cfgs["haematoxylin"].PSM.PSEUDO_MASK.METHOD == "haematoxylin"
    for method, cfg in cfgs.items():
        labels = str(tmp_path / method)
        for r in images:
            write_unit_map(os.path.join(labels, "activation", r["stem"] + ".png"), zero)
        run_pseudo_masks(images, labels, cfg, log=lambda m: None)
        p = cfg.PSM.PSEUDO_MASK
        for r in images:
            mask = cv2.imread(os.path.join(labels, "pseudo", r["stem"] + ".png"), cv2.IMREAD_UNCHANGED)
            image = cv2.imread(r["file_name"])[:, :, ::-1].copy()
            if method == "haematoxylin":
                expected = haematoxylin_mask(image, zero, p.H_SIGMA, p.ACT_WEIGHT, p.MIN_OBJECT_SIZE, p.MAX_HOLE_SIZE)
            else:
                expected = pseudo_mask(image, zero, p.K, p.BETA, p.MIN_OBJECT_SIZE, p.MAX_HOLE_SIZE, p.KMEANS_SAMPLE,
                                       seed=cfg.SEED % 2**31, prior=p.PRIOR, min_contrast=p.MIN_CONTRAST)
            assert np.array_equal(mask, expected)
            assert min(_precision_recall(mask, cv2.imread(r["instance_file_name"], -1) > 0)) > 0.8
    bad = load_config("configs/psm/detection.yaml", ["PSM.PSEUDO_MASK.METHOD", "otsu"], freeze=True)
    with pytest.raises(ValueError, match="'kmeans' or 'haematoxylin', got 'otsu'"):
        run_pseudo_masks(images, str(tmp_path / "labels2"), bad)
