"""``CellDatasetMapper``: Detectron2 dataset dict of a labeled cell image -> model input, robust to bad data.

Images (``read_image_checked``) are decoded with OpenCV, not PIL, because PIL cannot read 16-bit RGB and
Detectron2's ``read_image`` would clip 16-bit values. Outcomes, all naming the file:

* missing file -> ``FileNotFoundError``; undecodable (corrupt, empty) -> ``ValueError``;
* uint16 (or any non-uint8) image -> per-image min-max rescale to uint8, ``(x - min) * 255 / (max - min)``
  rounded (a constant image becomes 0), so 12-bit data in a 16-bit container keeps its contrast;
* HxW, HxWx1 (grayscale) -> replicated to 3 channels; HxWx2 (gray + alpha) and HxWx4 (BGRA) -> alpha dropped;
  any other channel count -> ``ValueError`` with the shape; output channel order = ``INPUT.FORMAT``
  ("BGR"/"RGB"). EXIF orientation is not applied (microscopy PNG/TIFF carry none).

Annotations (training only): ``iscrowd`` ones are ignored; a category id outside the data set's classes ->
``ValueError``; RLE masks must have the image's size (else ``ValueError``); polygons are rasterised at the
image size, so parts outside the image are clipped; masks that are empty (zero area, e.g. a polygon wholly
outside) are dropped and counted in ``num_empty_masks_dropped`` of the returned dict; an annotation without
a mask -> ``ValueError``. Boxes are recomputed from the (transformed) masks. An empty annotation list gives
empty ``instances``; a dict without ``annotations`` gives no ``instances`` key.

Training augmentation, all Detectron2 transforms: ``RandomCrop(INPUT.CROP.TYPE, INPUT.CROP.SIZE)`` when
``INPUT.CROP.ENABLED`` (re-drawn up to ``crop_tries`` times while it would contain no instance, then a crop
around a random instance's centre); then Detectron2's ``detection_utils.build_augmentation``:
``ResizeShortestEdge(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN)`` and the flip of ``INPUT.RANDOM_FLIP`` ("horizontal",
"vertical" or "none", as in Detectron2); an independent random vertical flip when ``INPUT.VERTICAL_FLIP`` (not
added when RANDOM_FLIP is already "vertical"); ``RandomBrightness``/``RandomContrast`` with factors uniform in
[1-x, 1+x] (``INPUT.BRIGHTNESS``/``INPUT.CONTRAST``; 0 = off); hue jitter ``INPUT.HUE`` and random erasing
``INPUT.ERASE_PROB`` (patch geometry ``MODEL.MMT_PSM.ERASE_*``), the authors' labeled augmentation
(:mod:`.photometric`; 0 = off). Test mode: the whole image resized by
``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``; annotations are dropped.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, polygons_to_bitmask
from pycocotools import mask as mask_util

from mmt_psm.core.image_io import read_image_file
from mmt_psm.core.registry import DATASET_MAPPERS
from mmt_psm.instance.augment import RandomErasing, RandomHue

__all__ = ["CellDatasetMapper", "read_image_checked"]

logger = logging.getLogger(__name__)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """Per-image min-max rescale of a non-uint8 image to uint8 (constant image -> zeros)."""
    if img.dtype == np.uint8:
        return img
    x = img.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(img.shape, np.uint8)
    return np.round((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def read_image_checked(path: str, fmt: str = "BGR") -> np.ndarray:
    """Read an image as HxWx3 uint8 in ``fmt`` ("BGR" or "RGB"); see the module docstring for every case."""
    if fmt not in ("BGR", "RGB"):
        raise ValueError(f"unsupported image format {fmt!r} (expected 'BGR' or 'RGB')")
    img = _to_uint8(read_image_file(path))
    if img.ndim == 3 and img.shape[2] in (1, 2):
        img = img[:, :, 0]  # grayscale (+ alpha)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]  # BGRA -> BGR
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(
            f"image file {path} has shape {img.shape}; expected HxW, HxWx1, HxWx2 (gray+alpha), HxWx3, HxWx4"
        )
    return np.ascontiguousarray(img[:, :, ::-1] if fmt == "RGB" else img)


class CellDatasetMapper:
    """Maps a labeled cell data set dict to ``{"image", "instances", ...}`` with validated annotations."""

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        image_format: str,
        augmentations: Sequence[T.Augmentation],
        crop: Optional[T.Augmentation] = None,
        class_names: Optional[Sequence[str]] = None,
        mask_format: str = "bitmask",
        crop_tries: int = 10,
    ):
        """``augmentations`` run after the (optional) instance-aware ``crop``; ``class_names`` gives the valid
        category ids 0..len-1 (None: not checked)."""
        if mask_format != "bitmask":
            msg = f"CellDatasetMapper makes BitMasks: set INPUT.MASK_FORMAT to bitmask, not {mask_format!r}"
            raise ValueError(msg)
        self.is_train = is_train
        self.image_format = image_format
        self.augmentations = T.AugmentationList(list(augmentations))
        self.crop = crop
        self.class_names = list(class_names) if class_names is not None else None
        self.crop_tries = int(crop_tries)
        mode = "training" if is_train else "inference"
        logger.info(f"[CellDatasetMapper] {mode}: crop={crop}, augmentations={list(augmentations)}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        """Augmentations and checks from ``cfg`` (see the module docstring)."""
        # Detectron2's own resize + INPUT.RANDOM_FLIP (train) / test resize, then this project's extras
        augs: List[T.Augmentation] = list(utils.build_augmentation(cfg, is_train))
        if is_train:
            if cfg.INPUT.get("VERTICAL_FLIP", False) and cfg.INPUT.RANDOM_FLIP != "vertical":
                augs.append(T.RandomFlip(horizontal=False, vertical=True))
            bright, contrast = cfg.INPUT.get("BRIGHTNESS", 0.0), cfg.INPUT.get("CONTRAST", 0.0)
            if bright > 0:
                augs.append(T.RandomBrightness(1.0 - bright, 1.0 + bright))
            if contrast > 0:
                augs.append(T.RandomContrast(1.0 - contrast, 1.0 + contrast))
            if cfg.INPUT.get("HUE", 0.0) > 0:
                augs.append(RandomHue(cfg.INPUT.HUE, cfg.INPUT.FORMAT))
            if cfg.INPUT.get("ERASE_PROB", 0.0) > 0:
                m = cfg.MODEL.MMT_PSM
                augs.append(RandomErasing(cfg.INPUT.ERASE_PROB, m.ERASE_MAX_PATCHES, m.ERASE_AREA, m.ERASE_ASPECT))
        crop = None
        if is_train and cfg.INPUT.CROP.ENABLED:
            crop = T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE)
        class_names = None
        if cfg.DATASETS.TRAIN:
            class_names = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", None)
        if class_names is None:
            class_names = [str(i) for i in range(cfg.MODEL.ROI_HEADS.NUM_CLASSES)]
        return {
            "is_train": is_train,
            "image_format": cfg.INPUT.FORMAT,
            "augmentations": augs,
            "crop": crop,
            "class_names": class_names,
            "mask_format": cfg.INPUT.MASK_FORMAT,
        }

    def _masks(self, annos: List[Dict[str, Any]], file_name: str, hw: Sequence[int]):
        """(classes, masks (N,H,W) uint8, number of empty masks dropped) after validation."""
        h, w = int(hw[0]), int(hw[1])
        classes, masks, dropped = [], [], 0
        n = len(self.class_names) if self.class_names is not None else None
        for obj in annos:
            if obj.get("iscrowd", 0):
                continue
            cid = obj.get("category_id")
            if not isinstance(cid, (int, np.integer)) or cid < 0 or (n is not None and cid >= n):
                raise ValueError(
                    f"{file_name}: annotation category_id {cid!r} is not one of the data set's categories "
                    f"(contiguous ids 0..{(n or 0) - 1}: {self.class_names})"
                )
            segm = obj.get("segmentation")
            if isinstance(segm, dict):
                rle = segm
                if isinstance(rle.get("counts"), list):  # uncompressed RLE
                    rle = mask_util.frPyObjects(rle, *rle["size"])
                if tuple(rle["size"]) != (h, w):
                    raise ValueError(f"{file_name}: RLE mask size {tuple(rle['size'])} != image {(h, w)}")
                m = mask_util.decode(rle)
            elif isinstance(segm, list):
                polys = [np.asarray(p, dtype=np.float64).reshape(-1) for p in segm if len(p) >= 6]
                m = polygons_to_bitmask(polys, h, w).astype(np.uint8)
            elif isinstance(segm, np.ndarray) and segm.shape == (h, w):
                m = segm.astype(np.uint8)
            else:
                raise ValueError(f"{file_name}: annotation without a usable mask (segmentation={type(segm)})")
            if not m.any():
                dropped += 1
                continue
            classes.append(int(cid))
            masks.append(m)
        stack = np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)
        return classes, stack, dropped

    def _draw_crop(self, image: np.ndarray, masks: np.ndarray) -> T.Transform:
        """A crop containing some instance: re-drawn up to ``crop_tries`` times, then centred on one."""
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

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Read, validate, augment; returns a new dict (the input is not modified)."""
        d = copy.deepcopy(dataset_dict)
        image = read_image_checked(d["file_name"], self.image_format)
        utils.check_image_size(d, image)
        annos = d.pop("annotations", None)
        if not self.is_train:
            annos = None
        if annos is not None:
            classes, masks, dropped = self._masks(annos, d["file_name"], image.shape[:2])
            d["num_empty_masks_dropped"] = dropped
        crop_tfm = T.NoOpTransform()
        if self.crop is not None:
            crop_tfm = self._draw_crop(image, masks if annos is not None else np.zeros((0, 1, 1), np.uint8))
            image = crop_tfm.apply_image(image)
        aug_input = T.AugInput(image)
        tfms = self.augmentations(aug_input)
        image = aug_input.image
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if annos is not None:
            hw = image.shape[:2]
            all_tfms = T.TransformList([crop_tfm] + tfms.transforms)
            objs = [  # masks made writable (PIL resize returns read-only arrays)
                {"category_id": c, "bbox": [0, 0, 0, 0], "bbox_mode": BoxMode.XYXY_ABS,
                 "segmentation": np.require(all_tfms.apply_segmentation(m), None, "CW")}
                for c, m in zip(classes, masks)
            ]
            inst = utils.annotations_to_instances(objs, hw, mask_format="bitmask")
            if not len(objs):
                inst.gt_masks = BitMasks(torch.zeros((0,) + tuple(hw), dtype=torch.bool))
            inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
            d["instances"] = utils.filter_empty_instances(inst)
        return d


@DATASET_MAPPERS.register("cell")
def build_cell_mapper(cfg, is_train: bool) -> CellDatasetMapper:
    """``INPUT.DATASET_MAPPER_NAME cell``: COCO instance annotations of cell images."""
    return CellDatasetMapper(cfg, is_train)
