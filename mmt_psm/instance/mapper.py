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

Masks are decoded after the crop is drawn, and only where needed: RLE and polygon annotations are kept as
compressed RLEs (a polygon is the RLE ``polygons_to_bitmask`` decodes), emptiness and boxes come from the RLE,
whether an annotation has a pixel in a crop from its box and the RLE intersected with the crop's rectangle, and
only the annotations with a pixel in the crop are decoded (then cut to the crop): the same instances, masks and
boxes as decoding every annotation at full frame first, for a fraction of the work on large images.

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
from detectron2.structures import BitMasks, BoxMode
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
        """(classes, lazily decoded masks, number of empty masks dropped) after validation; nothing decoded."""
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
                m = _LazyMask(rle=rle)
            elif isinstance(segm, list):
                polys = [np.asarray(p, dtype=np.float64).reshape(-1) for p in segm if len(p) >= 6]
                # detectron2's polygons_to_bitmask is decode(merge(frPyObjects(polys))), no polygon = empty
                m = _LazyMask(rle=mask_util.merge(mask_util.frPyObjects(polys, h, w))) if polys else None
            elif isinstance(segm, np.ndarray) and segm.shape == (h, w):
                m = _LazyMask(array=segm.astype(np.uint8))
            else:
                raise ValueError(f"{file_name}: annotation without a usable mask (segmentation={type(segm)})")
            if m is None or m.empty():
                dropped += 1
                continue
            classes.append(int(cid))
            masks.append(m)
        return classes, masks, dropped

    def _draw_crop(self, image: np.ndarray, masks: List[_LazyMask]) -> T.Transform:
        """A crop containing some instance: re-drawn up to ``crop_tries`` times, then centred on one."""
        tfm = self.crop.get_transform(image)
        if len(masks) == 0:
            return tfm
        for _ in range(self.crop_tries):
            if any(m.hits(tfm) for m in masks):
                return tfm
            tfm = self.crop.get_transform(image)
        k = np.random.randint(len(masks))
        inst = {"bbox": masks[k].box(), "bbox_mode": BoxMode.XYXY_ABS}
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
            crop_tfm = self._draw_crop(image, masks if annos is not None else [])
            image = crop_tfm.apply_image(image)
        aug_input = T.AugInput(image)
        tfms = self.augmentations(aug_input)
        image = aug_input.image
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if annos is not None:
            hw = image.shape[:2]
            # only the annotations with a pixel in the crop (the others would be empty, dropped below), decoded in it
            objs = [  # masks made writable (PIL resize returns read-only arrays)
                {"category_id": c, "bbox": [0, 0, 0, 0], "bbox_mode": BoxMode.XYXY_ABS,
                 "segmentation": np.require(tfms.apply_segmentation(m.after(crop_tfm)), None, "CW")}
                for c, m in zip(classes, masks) if m.hits(crop_tfm)
            ]
            inst = utils.annotations_to_instances(objs, hw, mask_format="bitmask")
            if not len(objs):
                inst.gt_masks = BitMasks(torch.zeros((0,) + tuple(hw), dtype=torch.bool))
            inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
            d["instances"] = utils.filter_empty_instances(inst)
        return d


class _LazyMask:
    """One annotation's non-crowd mask, decoded only when needed: a compressed RLE (RLE and polygon annotations)
    or a uint8 array (an array annotation). Crops are tested and cut exactly, without a full-frame decode where
    the mask is an RLE and the crop a ``CropTransform``."""

    def __init__(self, rle: Optional[Dict[str, Any]] = None, array: Optional[np.ndarray] = None):
        self.rle, self.array = rle, array
        if rle is not None:
            x, y, w, h = (int(v) for v in mask_util.toBbox(rle))
            self._box = (x, y, x + w, y + h)  # pixel box [x0, x1) x [y0, y1) of an RLE (exact)

    def empty(self) -> bool:
        return int(mask_util.area(self.rle)) == 0 if self.rle is not None else not self.array.any()

    def full(self) -> np.ndarray:
        """The full-frame HxW uint8 mask."""
        return mask_util.decode(self.rle) if self.rle is not None else self.array

    def box(self) -> List[int]:
        """XYXY pixel box ``[x0, y0, x1, y1]`` (x1, y1 exclusive) of a non-empty mask."""
        if self.rle is not None:
            x0, y0, x1, y1 = self._box
            return [x0, y0, x1, y1]
        ys, xs = np.nonzero(self.array)
        return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]

    def hits(self, tfm: T.Transform) -> bool:
        """Whether the mask has a pixel in what ``tfm`` (the crop) keeps."""
        if isinstance(tfm, T.NoOpTransform):
            return True
        if not isinstance(tfm, T.CropTransform):
            return bool(tfm.apply_segmentation(self.full()).any())
        x0, y0, x1, y1 = tfm.x0, tfm.y0, tfm.x0 + tfm.w, tfm.y0 + tfm.h
        if self.array is not None:
            return bool(self.array[y0:y1, x0:x1].any())
        bx0, by0, bx1, by1 = self._box
        if bx1 <= x0 or bx0 >= x1 or by1 <= y0 or by0 >= y1:
            return False
        if x0 <= bx0 and bx1 <= x1 and y0 <= by0 and by1 <= y1:
            return True  # a non-empty mask wholly inside
        window = _rect_rle(x0, y0, x1, y1, *self.rle["size"])
        return int(mask_util.area(mask_util.merge([self.rle, window], intersect=True))) > 0

    def after(self, tfm: T.Transform) -> np.ndarray:
        """The mask through ``tfm`` (the crop): a crop of an RLE decodes the RLE and cuts the window."""
        if isinstance(tfm, T.NoOpTransform):
            return self.full()
        if isinstance(tfm, T.CropTransform):
            return np.ascontiguousarray(self.full()[tfm.y0:tfm.y0 + tfm.h, tfm.x0:tfm.x0 + tfm.w])
        return tfm.apply_segmentation(self.full())


def _rect_rle(x0: int, y0: int, x1: int, y1: int, h: int, w: int) -> Dict[str, Any]:
    """Compressed RLE (column-major) of the rectangle ``[x0, x1) x [y0, y1)`` in an ``h x w`` frame."""
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return mask_util.frPyObjects({"counts": [h * w], "size": [h, w]}, h, w)
    rows = y1 - y0
    counts = [x0 * h + y0, rows] + [h - rows, rows] * (x1 - x0 - 1) + [h - y1 + (w - x1) * h]
    return mask_util.frPyObjects({"counts": counts, "size": [h, w]}, h, w)


@DATASET_MAPPERS.register("cell")
def build_cell_mapper(cfg, is_train: bool) -> CellDatasetMapper:
    """``INPUT.DATASET_MAPPER_NAME cell``: COCO instance annotations of cell images."""
    return CellDatasetMapper(cfg, is_train)
