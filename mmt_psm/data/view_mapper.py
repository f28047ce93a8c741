"""MMT-PSM's unlabeled-image mapper: one shared crop/resize/flip, then K teacher copies (+ flips) and a student
copy, each with its own colour jitter and random erasing (DESIGN.md, MMT-PSM step 1)."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
from detectron2.config import CfgNode, configurable
from detectron2.data import transforms as T

from mmt_psm.modeling.views import make_unlabeled_views

from .mapper import read_image_checked
from .unlabeled import register_unlabeled_mapper


class MMTPSMViewMapper:
    """Dataset dict of an unlabeled image -> dict with ``teacher_views``/``teacher_transforms`` (2K views:
    copy_k and copy_k h-flipped) and ``student_view``/``student_transform``, as uint8 CHW tensors.

    Randomness comes from numpy's global RNG (seeded per sample by the training loader)."""

    @configurable
    def __init__(
        self,
        *,
        image_format: str,
        crop_size: tuple,
        resize: T.ResizeShortestEdge,
        view_kwargs: Dict[str, Any],
    ):
        self.image_format, self.crop_size, self.resize = image_format, crop_size, resize
        self.view_kwargs = view_kwargs

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, Any]:
        m = cfg.MODEL.MMT_PSM
        crop = tuple(cfg.INPUT.CROP.SIZE) if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute" else ()
        return {
            "image_format": cfg.INPUT.FORMAT,
            "crop_size": crop,
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
            },
        }

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        image = read_image_checked(dataset_dict["file_name"], self.image_format)
        if self.crop_size:
            ch, cw = min(self.crop_size[0], image.shape[0]), min(self.crop_size[1], image.shape[1])
            y0 = np.random.randint(image.shape[0] - ch + 1)
            x0 = np.random.randint(image.shape[1] - cw + 1)
            image = image[y0 : y0 + ch, x0 : x0 + cw]
        tfm = self.resize.get_transform(image)
        h, w = tfm.new_h, tfm.new_w
        rng = np.random.default_rng(np.random.randint(2**31))
        views = make_unlabeled_views(image, rng, resize_to=(h, w), **self.view_kwargs)
        out = {k: dataset_dict[k] for k in ("file_name", "image_id") if k in dataset_dict}
        out.update(height=h, width=w, **views)
        return out


@register_unlabeled_mapper("MMTPSMRCNN")
def build_mmt_psm_view_mapper(cfg: CfgNode) -> MMTPSMViewMapper:
    """Unlabeled mapper for ``MODEL.META_ARCHITECTURE: MMTPSMRCNN``."""
    return MMTPSMViewMapper(cfg)
