"""MoNuSeg 2018 from its official XML polygons: instance label maps (uint16 PNG) and COCO instance JSON.

Why from the XML: the polygons are the official annotation; the staged ``labels/<id>_label.png`` maps are only a
cross-check (``tests/nuclei/test_psm_data.py``). Polygons are filled in file order with OpenCV (later regions win where
two overlap, as in the usual MoNuSeg rasterisation). Importable without Detectron2.

Output of :func:`convert_monuseg` under ``out``::

    <split>/images/<id>.png           RGB copies of the source images
    <split>/labels/<id>.png           uint16 instance map (0 = background, 1..N in XML order)
    <split>/instances_<split>.json    COCO instances (one category "nucleus", id 1, RLE masks)
"""
from __future__ import annotations

import gzip
import os
import shutil
import xml.etree.ElementTree as ET
from typing import Dict, List, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_util

from mmt_psm.core.atomic import write_image, write_json

__all__ = ["parse_monuseg_xml", "rasterize_polygons", "instances_to_coco", "convert_monuseg", "MONUSEG_SPLITS"]

MONUSEG_SPLITS = ("train", "test")


def parse_monuseg_xml(path: str) -> List[np.ndarray]:
    """Polygons (each (K, 2) float32 x, y) of every ``Region`` of an Aperio XML file (``.xml`` or ``.xml.gz``)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            root = ET.parse(f).getroot()
    except (OSError, ET.ParseError) as e:
        raise ValueError(f"cannot parse MoNuSeg annotation {path}: {e}") from e
    polygons = []
    for region in root.iter("Region"):
        pts = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        if len(pts) >= 3:
            polygons.append(np.asarray(pts, np.float32))
    return polygons


def rasterize_polygons(polygons: Sequence[np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """uint16 instance map of ``shape`` (H, W): polygon i filled with i + 1 (later polygons overwrite)."""
    if len(polygons) > 65535:
        raise ValueError(f"{len(polygons)} polygons do not fit a uint16 instance map")
    out = np.zeros(tuple(shape[:2]), np.uint16)
    for i, poly in enumerate(polygons):
        cv2.fillPoly(out, [np.round(poly).astype(np.int32).reshape(-1, 1, 2)], int(i + 1))
    return out


def instances_to_coco(label_maps: Dict[str, np.ndarray], file_names: Dict[str, str]) -> dict:
    """COCO instance dict (RLE masks, category 1 "nucleus") of instance maps keyed by image id string."""
    images, anns = [], []
    for image_id, key in enumerate(sorted(label_maps), start=1):
        lab = label_maps[key]
        images.append({"id": image_id, "file_name": file_names[key], "height": int(lab.shape[0]),
                       "width": int(lab.shape[1])})
        for v in np.unique(lab[lab > 0]):
            m = np.asfortranarray((lab == v).astype(np.uint8))
            rle = mask_util.encode(m)
            anns.append({
                "id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_util.area(rle)), "bbox": [float(x) for x in mask_util.toBbox(rle)],
            })
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nucleus"}]}


def convert_monuseg(source: str, out: str, splits: Sequence[str] = MONUSEG_SPLITS, verbose: bool = True) -> dict:
    """Convert ``source/<split>/{images,annotations_xml}`` to ``out`` (see module doc); returns counts per split."""
    counts = {}
    for split in splits:
        img_dir, xml_dir = os.path.join(source, split, "images"), os.path.join(source, split, "annotations_xml")
        if not os.path.isdir(img_dir) or not os.path.isdir(xml_dir):
            raise FileNotFoundError(f"MoNuSeg {split}: expected {img_dir} and {xml_dir}")
        out_img, out_lab = os.path.join(out, split, "images"), os.path.join(out, split, "labels")
        os.makedirs(out_img, exist_ok=True)  # shutil.copyfile below; the label / JSON writers create theirs
        maps, names = {}, {}
        ids = sorted(os.path.splitext(f)[0] for f in os.listdir(img_dir) if f.lower().endswith(".png"))
        for k, image_id in enumerate(ids):
            src_img = os.path.join(img_dir, image_id + ".png")
            img = cv2.imread(src_img, cv2.IMREAD_UNCHANGED)
            if img is None:
                raise OSError(f"cannot read MoNuSeg image {src_img}")
            xml = os.path.join(xml_dir, image_id + ".xml.gz")
            if not os.path.isfile(xml):
                xml = os.path.join(xml_dir, image_id + ".xml")
            if not os.path.isfile(xml):
                raise FileNotFoundError(f"no annotation for {src_img} in {xml_dir}")
            lab = rasterize_polygons(parse_monuseg_xml(xml), img.shape[:2])
            shutil.copyfile(src_img, os.path.join(out_img, image_id + ".png"))
            write_image(os.path.join(out_lab, image_id + ".png"), lab)
            maps[image_id], names[image_id] = lab, image_id + ".png"
            if verbose:
                print(f"[monuseg {split}] {k + 1}/{len(ids)} {image_id}: {len(np.unique(lab)) - 1} nuclei", flush=True)
        write_json(os.path.join(out, split, f"instances_{split}.json"), instances_to_coco(maps, names), indent=None)
        counts[split] = {"images": len(ids), "nuclei": int(sum(len(np.unique(m)) - 1 for m in maps.values()))}
    return counts
