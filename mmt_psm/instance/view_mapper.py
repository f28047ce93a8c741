"""MMT-PSM's unlabeled-image mapper: one shared crop/resize/flip, then K teacher copies (+ flips) and a student
copy, each with its own colour jitter and random erasing (step 1 of MMT-PSM, Zhou et al., MICCAI 2020).

The crop and resize are the labeled stream's (``CellDatasetMapper``): Detectron2's
``RandomCrop(INPUT.CROP.TYPE, INPUT.CROP.SIZE)`` when ``INPUT.CROP.ENABLED`` (every crop type), then
``ResizeShortestEdge(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN, MIN_SIZE_TRAIN_SAMPLING)`` applied with Detectron2's own
resize transform, so both streams see objects at the same scale. The shared base flip is horizontal with
p = 0.5 when ``INPUT.RANDOM_FLIP`` is "horizontal" (the authors' setting), else off (view geometry is
horizontal-only)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
from detectron2.config import CfgNode, configurable
from detectron2.data import transforms as T

from mmt_psm.core.registry import register_unlabeled_mapper
from mmt_psm.instance.mapper import read_image_checked
from mmt_psm.instance.views import make_unlabeled_views


class MMTPSMViewMapper:
    """Dataset dict of an unlabeled image -> dict with ``teacher_views``/``teacher_transforms`` (2K views:
    copy_k and copy_k h-flipped) and ``student_view``/``student_transform``, as uint8 CHW tensors.

    Randomness comes from numpy's global RNG (seeded per sample by the training loader)."""

    @configurable
    def __init__(
        self,
        *,
        image_format: str,
        crop: Optional[T.RandomCrop],
        resize: T.ResizeShortestEdge,
        view_kwargs: Dict[str, Any],
    ):
        self.image_format, self.crop, self.resize = image_format, crop, resize
        self.view_kwargs = view_kwargs

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, Any]:
        m = cfg.MODEL.MMT_PSM
        crop = T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE) if cfg.INPUT.CROP.ENABLED else None
        return {
            "image_format": cfg.INPUT.FORMAT,
            "crop": crop,
            "resize": T.ResizeShortestEdge(
                cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
            ),
            "view_kwargs": {
                "num_teacher_copies": m.NUM_TEACHER_COPIES,
                "teacher_flip": m.TEACHER_FLIP,
                "brightness": m.BRIGHTNESS,
                "contrast": m.CONTRAST,
                "hue": m.HUE,
                "erase_prob": m.ERASE_PROB,
                "erase_max_patches": m.ERASE_MAX_PATCHES,
                "erase_area": tuple(m.ERASE_AREA),
                "erase_aspect": tuple(m.ERASE_ASPECT),
                "image_format": cfg.INPUT.FORMAT,
                "base_flip_prob": 0.5 if cfg.INPUT.RANDOM_FLIP == "horizontal" else 0.0,
            },
        }

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        image = read_image_checked(dataset_dict["file_name"], self.image_format)
        transforms = []
        if self.crop is not None:
            transforms.append(self.crop.get_transform(image))
            image = transforms[-1].apply_image(image)
        transforms.append(self.resize.get_transform(image))
        image = transforms[-1].apply_image(image)
        h, w = image.shape[:2]
        rng = np.random.default_rng(np.random.randint(2**31))
        views = make_unlabeled_views(image, rng, **self.view_kwargs)
        out = {k: dataset_dict[k] for k in ("file_name", "image_id") if k in dataset_dict}
        # source_transform: original file -> the cropped/resized image the views are made from (the pseudo-label
        # monitor maps held-back ground truth with it, then with base_transform and the view's transform)
        out.update(height=h, width=w, source_transform=T.TransformList(transforms), **views)
        return out


@register_unlabeled_mapper("MMTPSMRCNN")
def build_mmt_psm_view_mapper(cfg: CfgNode) -> MMTPSMViewMapper:
    """Unlabeled mapper for ``MODEL.META_ARCHITECTURE: MMTPSMRCNN``."""
    return MMTPSMViewMapper(cfg)
