"""PSM data: MoNuSeg converter (vs the staged label maps), H&E image reading, label folders, the mapper."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
from common import (
    REPO,  # noqa: E402
    SHARED_DATA,
)
from detectron2.config import get_cfg
from psm_common import he_tile, write_tiles
from pycocotools import mask as mask_util

from mmt_psm.config import add_mmt_psm_config
from mmt_psm.nuclei.datasets import load_psm_index, register_psm_labels
from mmt_psm.nuclei.mapper import PSMNucleiMapper
from mmt_psm.nuclei.monuseg import convert_monuseg, parse_monuseg_xml, rasterize_polygons
from mmt_psm.nuclei.tile_io import list_images, read_he_image, write_index

MONUSEG = os.path.join(SHARED_DATA, "nuclei", "monuseg")
needs_monuseg = pytest.mark.skipif(not os.path.isdir(MONUSEG), reason=f"MoNuSeg not staged at {MONUSEG}")


@needs_monuseg
def test_xml_rasterisation_matches_staged_label_map():
    image_id = "TCGA-2Z-A9J9-01A-01-TS1"
    ref = cv2.imread(os.path.join(MONUSEG, "test", "labels", f"{image_id}_label.png"), cv2.IMREAD_UNCHANGED)
    lab = rasterize_polygons(parse_monuseg_xml(os.path.join(MONUSEG, "test", "annotations_xml",
                                                            f"{image_id}.xml.gz")), ref.shape)
    assert lab.dtype == np.uint16 and lab.max() == ref.max()
    assert len(np.unique(lab)) == len(np.unique(ref))
    assert ((lab > 0) == (ref > 0)).mean() > 0.99  # rounding of polygon vertices differs by a pixel at edges
    assert (lab == ref).mean() > 0.99  # same instance ids


@needs_monuseg
def test_convert_monuseg_writes_maps_and_coco(tmp_path):
    src = tmp_path / "src" / "test"
    image_id = "TCGA-2Z-A9J9-01A-01-TS1"
    for sub, name in (("images", f"{image_id}.png"), ("annotations_xml", f"{image_id}.xml.gz")):
        (src / sub).mkdir(parents=True)
        os.symlink(os.path.join(MONUSEG, "test", sub, name), src / sub / name)
    counts = convert_monuseg(str(tmp_path / "src"), str(tmp_path / "out"), splits=("test",), verbose=False)
    lab = cv2.imread(str(tmp_path / "out" / "test" / "labels" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
    coco = json.load(open(tmp_path / "out" / "test" / "instances_test.json"))
    assert counts["test"] == {"images": 1, "nuclei": len(coco["annotations"])} and len(coco["annotations"]) == 575
    first = coco["annotations"][0]
    m = mask_util.decode({"size": first["segmentation"]["size"], "counts": first["segmentation"]["counts"]})
    assert np.array_equal(m.astype(bool), lab == 1)


def test_read_he_image_variants(tmp_path):
    img, _ = he_tile()
    rgba = np.concatenate([img[:, :, ::-1], np.full(img.shape[:2] + (1,), 128, np.uint8)], axis=2)
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    assert np.array_equal(read_he_image(str(tmp_path / "rgba.png")), img)  # alpha dropped, RGB order
    cv2.imwrite(str(tmp_path / "gray.png"), img[:, :, 0])
    gray = read_he_image(str(tmp_path / "gray.png"))
    assert gray.shape == img.shape and np.array_equal(gray[:, :, 1], img[:, :, 0])
    cv2.imwrite(str(tmp_path / "deep.tif"), img[:, :, ::-1].astype(np.uint16) * 257)
    assert np.array_equal(read_he_image(str(tmp_path / "deep.tif")), img)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(OSError, match="broken.png"):
        read_he_image(str(tmp_path / "broken.png"))


def test_list_images_errors(tmp_path):
    with pytest.raises(ValueError, match="has no images"):
        list_images(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(str(tmp_path / "nope"))
    write_tiles(str(tmp_path), n=1)
    cv2.imwrite(str(tmp_path / "tile0.tif"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="share the name 'tile0'"):
        list_images(str(tmp_path))


def _label_folder(tmp_path, crop=0):
    img, inst = he_tile(centres=((24, 24),))
    (tmp_path / "img").mkdir()
    path = str(tmp_path / "img" / "tile0.png")
    cv2.imwrite(path, img[:, :, ::-1])
    folder = tmp_path / "labels"
    for sub in ("pseudo", "voronoi"):
        (folder / sub).mkdir(parents=True)
    pseudo = (inst > 0).astype(np.uint8)
    vor = np.full(inst.shape, 255, np.uint8)
    vor[:, 50] = 0
    vor[22:27, 22:27] = 1
    cv2.imwrite(str(folder / "pseudo" / "tile0.png"), pseudo)
    cv2.imwrite(str(folder / "voronoi" / "tile0.png"), vor)
    write_index(str(folder), [{"stem": "tile0", "file_name": path, "height": 96, "width": 96,
                               "pseudo_mask": "pseudo/tile0.png", "voronoi": "voronoi/tile0.png"}])
    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "psm", "Base-PSM-UNet.yaml"))
    cfg.INPUT.PSM_CROP_SIZE = crop
    return str(folder), cfg, pseudo, vor


def test_label_folder_registration_and_mapper_keep_labels_aligned(tmp_path):
    folder, cfg, pseudo, vor = _label_folder(tmp_path, crop=64)
    from detectron2.data import DatasetCatalog

    register_psm_labels("psm_test_folder", folder)
    (d,) = DatasetCatalog.get("psm_test_folder")
    assert d["sem_seg_file_name"].endswith("pseudo/tile0.png") and "instance_file_name" not in d
    mapper = PSMNucleiMapper(cfg, is_train=True)
    for _ in range(5):
        out = mapper(d)
        assert out["image"].shape == (3, 64, 64) and out["sem_seg"].shape == (64, 64) == out["voronoi"].shape
        dark = out["image"].numpy().mean(axis=0) < 130  # the synthetic nucleus is dark: it moves with its label
        assert np.array_equal(dark, out["sem_seg"].numpy() == 1)
    test = PSMNucleiMapper(cfg, is_train=False)(d)
    assert test["image"].shape == (3, 96, 96) and "sem_seg" not in test and test["height"] == 96


def test_label_folder_errors(tmp_path):
    folder, cfg, _, _ = _label_folder(tmp_path)
    os.remove(os.path.join(folder, "voronoi", "tile0.png"))
    with pytest.raises(FileNotFoundError, match="voronoi/tile0.png"):
        load_psm_index(folder)
    with pytest.raises(FileNotFoundError, match="index.json missing"):
        load_psm_index(str(tmp_path / "empty"))
    cv2.imwrite(os.path.join(folder, "pseudo", "tile0.png"), np.full((96, 96), 7, np.uint8))
    d = {"file_name": os.path.join(str(tmp_path), "img", "tile0.png"),
         "sem_seg_file_name": os.path.join(folder, "pseudo", "tile0.png")}
    with pytest.raises(ValueError, match="label values \\[7\\]"):
        PSMNucleiMapper(cfg, is_train=True)(d)
