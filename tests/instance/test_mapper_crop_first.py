"""CellDatasetMapper decodes masks after the crop is drawn and only for the annotations in the crop: its outputs
equal the full-frame path's (every annotation decoded, stacked, then cropped: the mapper as it was, kept here as
the reference) for random crops of synthetic images with every kind of annotation, RNG draws included."""
from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, polygons_to_bitmask
from pycocotools import mask as mask_util

from mmt_psm.instance.mapper import CellDatasetMapper, _LazyMask, _rect_rle, read_image_checked

H, W = 150, 200


class FullFrameMapper(CellDatasetMapper):
    """The full-frame reference: every annotation decoded at the image size first (the mapper before crop-first
    decoding, verbatim but for the names)."""

    def _dense_masks(self, annos, file_name, hw):
        h, w = int(hw[0]), int(hw[1])
        classes, masks, dropped = [], [], 0
        for obj in annos:
            if obj.get("iscrowd", 0):
                continue
            segm = obj["segmentation"]
            if isinstance(segm, dict):
                rle = segm
                if isinstance(rle.get("counts"), list):
                    rle = mask_util.frPyObjects(rle, *rle["size"])
                m = mask_util.decode(rle)
            elif isinstance(segm, list):
                polys = [np.asarray(p, dtype=np.float64).reshape(-1) for p in segm if len(p) >= 6]
                m = polygons_to_bitmask(polys, h, w).astype(np.uint8)
            else:
                m = segm.astype(np.uint8)
            if not m.any():
                dropped += 1
                continue
            classes.append(int(obj["category_id"]))
            masks.append(m)
        return classes, np.stack(masks) if masks else np.zeros((0, h, w), np.uint8), dropped

    def _dense_crop(self, image, masks):
        tfm = self.crop.get_transform(image)
        if len(masks) == 0:
            return tfm
        union = masks.any(axis=0).astype(np.uint8)
        for _ in range(self.crop_tries):
            if tfm.apply_segmentation(union).any():
                return tfm
            tfm = self.crop.get_transform(image)
        k = np.random.randint(len(masks))
        ys, xs = np.nonzero(masks[k])
        inst = {"bbox": [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], "bbox_mode": BoxMode.XYXY_ABS}
        return utils.gen_crop_transform_with_instance((tfm.h, tfm.w), image.shape[:2], inst)

    def __call__(self, dataset_dict):
        d = copy.deepcopy(dataset_dict)
        image = read_image_checked(d["file_name"], self.image_format)
        annos = d.pop("annotations")
        classes, masks, dropped = self._dense_masks(annos, d["file_name"], image.shape[:2])
        d["num_empty_masks_dropped"] = dropped
        crop_tfm = T.NoOpTransform()
        if self.crop is not None:
            crop_tfm = self._dense_crop(image, masks)
            image = crop_tfm.apply_image(image)
        aug_input = T.AugInput(image)
        tfms = self.augmentations(aug_input)
        image = aug_input.image
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        hw = image.shape[:2]
        all_tfms = T.TransformList([crop_tfm] + tfms.transforms)
        objs = [{"category_id": c, "bbox": [0, 0, 0, 0], "bbox_mode": BoxMode.XYXY_ABS,
                 "segmentation": np.require(all_tfms.apply_segmentation(m), None, "CW")}
                for c, m in zip(classes, masks)]
        inst = utils.annotations_to_instances(objs, hw, mask_format="bitmask")
        if not len(objs):
            inst.gt_masks = BitMasks(torch.zeros((0,) + tuple(hw), dtype=torch.bool))
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        d["instances"] = utils.filter_empty_instances(inst)
        return d


def _cell(rng, h=H, w=W):
    """A bool mask: an ellipse, a ring (no pixel at its centre) or an L shape (its box mostly empty)."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(-0.05, 1.05, 2) * [h, w]
    ry, rx = rng.uniform(3, 25, 2)
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    kind = rng.integers(3)
    if kind == 0:
        return r <= 1
    if kind == 1:
        return (r <= 1) & (r >= 0.6)
    return ((np.abs(yy - cy) < 2) & (np.abs(xx - cx) < rx)) | ((np.abs(xx - cx) < 2) & (np.abs(yy - cy) < ry))


def _sample(tmp_path, seed, n=30):
    """A noise image and ``n`` annotations of every kind: compressed and uncompressed RLE, polygons (some reaching
    out of the image, one wholly outside, one too short), arrays, crowd ones and empty ones."""
    rng = np.random.default_rng(seed)
    path = str(tmp_path / f"im{seed}.png")
    cv2.imwrite(path, rng.integers(0, 256, (H, W), dtype=np.uint8))
    annos = []
    for k in range(n):
        m = _cell(rng)
        kind = k % 6
        if kind == 0:
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            segm = {"size": rle["size"], "counts": rle["counts"].decode()}
        elif kind == 1:  # uncompressed RLE (column-major run lengths)
            flat = m.astype(np.uint8).flatten(order="F")
            change = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
            segm = {"size": [H, W], "counts": np.diff(np.r_[0, change]).tolist()}
            assert mask_util.decode(mask_util.frPyObjects(segm, H, W)).astype(bool).tolist() == m.tolist()
        elif kind in (2, 3):  # polygons around the cell's box, partly outside where the cell is
            ys, xs = np.nonzero(m) if m.any() else (np.array([-20, -10]), np.array([-20, -10]))
            x0, y0, x1, y1 = xs.min() - 0.5, ys.min() - 0.5, xs.max() + 3.5, ys.max() + 0.5
            segm = [[x0, y0, x1, y0 + 2, x1 - 1, y1, x0, y1 - 3]]
            if kind == 3:
                segm.append([1.0, 2.0, 3.0, 4.0])  # < 6 coordinates: ignored
        elif kind == 4:
            segm = m.astype(np.uint8)
        else:
            segm = {"size": [H, W], "counts": mask_util.encode(np.asfortranarray(m.astype(np.uint8)))["counts"]}
        annos.append({"category_id": int(rng.integers(2)), "segmentation": segm, "iscrowd": int(k == 7),
                      "bbox": [0, 0, 1, 1], "bbox_mode": BoxMode.XYWH_ABS})
    annos.append({"category_id": 1, "segmentation": [[-30.0, -30.0, -20.0, -30.0, -25.0, -20.0]], "iscrowd": 0,
                  "bbox": [0, 0, 1, 1], "bbox_mode": BoxMode.XYWH_ABS})  # wholly outside: empty, dropped
    annos.append({"category_id": 0, "segmentation": np.zeros((H, W), np.uint8), "iscrowd": 0,
                  "bbox": [0, 0, 1, 1], "bbox_mode": BoxMode.XYWH_ABS})
    return {"file_name": path, "height": H, "width": W, "image_id": seed, "annotations": annos}


AUGS = [T.ResizeShortestEdge((96, 128, 160), 400, "choice"), T.RandomFlip(), T.RandomFlip(horizontal=False,
        vertical=True), T.RandomBrightness(0.9, 1.1)]


@pytest.mark.parametrize("crop", [("absolute", (24, 24)), ("absolute", (64, 96)), ("absolute_range", (40, 160)),
                                  ("relative", (0.5, 0.5)), None], ids=lambda c: f"{c[0]}{c[1]}" if c else "none")
def test_crop_first_decoding_equals_the_full_frame_path(tmp_path, monkeypatch, crop):
    centred = []  # crops drawn around an instance after crop_tries misses
    gen = utils.gen_crop_transform_with_instance
    monkeypatch.setattr(utils, "gen_crop_transform_with_instance", lambda *a: centred.append(a) or gen(*a))
    kw = dict(image_format="BGR", augmentations=AUGS, class_names=["a", "b"],
              crop=T.RandomCrop(*crop) if crop else None, crop_tries=3)
    new, old = CellDatasetMapper(True, **kw), FullFrameMapper(True, **kw)
    kept = 0
    for seed in range(6):
        d = _sample(tmp_path, seed, n=30 if seed % 2 else 6)  # sparse images: small crops miss, the fallback runs
        for draw in range(5):
            np.random.seed(100 * seed + draw)
            a = new(d)
            state_new = np.random.get_state()[1].copy()
            np.random.seed(100 * seed + draw)
            b = old(d)
            assert np.array_equal(state_new, np.random.get_state()[1])  # the same random draws, in order
            assert torch.equal(a["image"], b["image"])
            assert a["num_empty_masks_dropped"] == b["num_empty_masks_dropped"] >= 2  # the 2 empty ones at least
            ia, ib = a["instances"], b["instances"]
            assert ia.image_size == ib.image_size and len(ia) == len(ib)
            assert torch.equal(ia.gt_classes, ib.gt_classes)
            assert torch.equal(ia.gt_masks.tensor, ib.gt_masks.tensor)
            assert torch.equal(ia.gt_boxes.tensor, ib.gt_boxes.tensor)
            kept += len(ia)
    assert kept > 0
    assert len(centred) > 0 if crop and crop[1] == (24, 24) else True  # small crops: the fallback ran too
    assert d["annotations"][0]["segmentation"]["counts"]  # the input dict is untouched


def test_crop_window_rle_and_hits_equal_dense_masks():
    rng = np.random.default_rng(0)
    for _ in range(200):
        y0, x0 = rng.integers(-5, H), rng.integers(-5, W)
        y1, x1 = y0 + rng.integers(0, H), x0 + rng.integers(0, W)
        dense = np.zeros((H, W), np.uint8)
        dense[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1
        assert np.array_equal(mask_util.decode(_rect_rle(x0, y0, x1, y1, H, W)), dense)
        m = _cell(rng).astype(np.uint8)
        if not m.any():
            continue
        lazy = _LazyMask(rle=mask_util.encode(np.asfortranarray(m)))
        ys, xs = np.nonzero(m)
        assert lazy.box() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        tfm = T.CropTransform(max(x0, 0), max(y0, 0), rng.integers(1, 60), rng.integers(1, 60))
        assert lazy.hits(tfm) == bool(tfm.apply_segmentation(m).any())
        assert np.array_equal(lazy.after(tfm), tfm.apply_segmentation(m))
