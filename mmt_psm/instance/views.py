"""Views of an unlabeled image for MMT-PSM (step 1) and the exact geometry to map between them.

One shared resize (+ random h-flip) gives the *base* view; every teacher/student view is a photometrically
perturbed copy of it, optionally h-flipped. Each view carries a :class:`ViewTransform` from the base frame, so
boxes, masks and feature maps computed on a flipped view map back to the base frame exactly.

Padding and flips: Detectron2 pads a batch at the bottom/right (to ``SIZE_DIVISIBILITY``). A view flipped in
its own unpadded frame therefore has its content in columns ``[0, W)`` of the padded tensor, and at a level of
stride ``s`` in columns ``[0, ceil(W / s))``. Flipping a feature map back must reverse only those columns
(:func:`flip_feature_map`), not the whole padded width. This is exact for operators aligned to ``s``-blocks
(e.g. average pooling with kernel = stride) when ``W`` is a multiple of ``s``; real strided convolutions are
flip equivariant only up to a sub-stride shift (true of the authors' ``torch.flip`` of padded maps as well).
Choose resize sizes that are multiples of the largest stride (64 for P6) for the tightest alignment.

The photometric perturbation of each copy is :mod:`mmt_psm.instance.augment` (the authors' transforms).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from mmt_psm.instance.augment import color_jitter, random_erase

__all__ = [
    "ViewTransform",
    "level_width",
    "flip_feature_map",
    "make_unlabeled_views",
]



def level_width(width: int, stride: int) -> int:
    """Columns of a stride-``stride`` map that see ``width`` image pixels: ``ceil(width / stride)``."""
    return -(-int(width) // int(stride))


def flip_feature_map(
    feat: torch.Tensor, valid_width: Union[int, Sequence[int], torch.Tensor]
) -> torch.Tensor:
    """Reverse the first ``valid_width`` columns of ``feat [B, C, H, W]``; the rest (padding) stays in place.

    ``valid_width`` is one int for the batch or one per image (``[B]``, then a single vectorised gather; 0 leaves
    an image as it is). Host ints are checked on the host (no device sync), a tensor on its device.
    Applying it twice gives back the input; autograd flows through it.
    """
    width = feat.shape[-1]
    if isinstance(valid_width, (int, np.integer)):
        vw = int(valid_width)
        if not 0 <= vw <= width:
            raise ValueError(f"valid_width {vw} outside [0, {width}]")
        if vw == width:
            return feat.flip(-1)
        return torch.cat([feat[..., :vw].flip(-1), feat[..., vw:]], dim=-1)
    if isinstance(valid_width, torch.Tensor):  # checked on the device (a sync)
        vw_t = valid_width.to(device=feat.device, dtype=torch.long).reshape(-1)
        bad = vw_t.numel() == feat.shape[0] and bool(((vw_t < 0) | (vw_t > width)).any())
    else:  # host ints: checked on the host, then one host-to-device copy
        widths = [int(w) for w in valid_width]
        bad = any(not 0 <= w <= width for w in widths)
        vw_t = torch.as_tensor(widths, dtype=torch.long, device=feat.device)
    if vw_t.numel() != feat.shape[0]:
        raise ValueError(f"{vw_t.numel()} valid widths for a batch of {feat.shape[0]}")
    if bad:
        raise ValueError(f"valid widths {vw_t.tolist()} outside [0, {width}]")
    col = torch.arange(width, device=feat.device)
    index = torch.where(col < vw_t[:, None], vw_t[:, None] - 1 - col, col)  # [B, W]
    index = index.view(feat.shape[0], *([1] * (feat.dim() - 2)), width).expand_as(feat)
    return feat.gather(-1, index)


def _unwrap(x: Any) -> Tuple[torch.Tensor, Any]:
    """Tensor inside a Detectron2 structure (``Boxes``/``BitMasks``) and a function to rewrap a result."""
    if hasattr(x, "tensor") and not isinstance(x, torch.Tensor):
        return x.tensor, type(x)
    return x, lambda t: t


def _resize_masks(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize ``[N, H, W]`` masks: float -> bilinear, bool/int -> nearest (PIL NEAREST semantics); dtype
    kept."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    if masks.is_floating_point():
        return F.interpolate(masks[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    out = F.interpolate(masks[:, None].to(torch.float32), size=size, mode="nearest-exact")[:, 0]
    return out.to(masks.dtype)


@dataclass(frozen=True)
class ViewTransform:
    """Map from a *source* frame (h, w) to a view: resize to ``resized`` (h, w), then optionally h-flip.

    Boxes use Detectron2's conventions (XYXY, ``x -> W - x`` for a flip), so ``apply``/``inverse`` are exact
    inverses up to float rounding of the resize scale (exact when no resize).
    """

    source: Tuple[int, int]
    resized: Tuple[int, int]
    hflip: bool = False

    @property
    def scale_xy(self) -> Tuple[float, float]:
        """(x, y) scale factors from the source to the view."""
        return self.resized[1] / self.source[1], self.resized[0] / self.source[0]

    # ------------------------------------------------------------------ boxes
    def _flip_boxes(self, b: torch.Tensor, width: int) -> torch.Tensor:
        return torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)

    def apply_boxes(self, boxes: Any) -> Any:
        """Source-frame ``[N, 4]`` XYXY boxes (tensor or ``Boxes``) -> view frame."""
        b, wrap = _unwrap(boxes)
        sx, sy = self.scale_xy
        out = b * b.new_tensor([sx, sy, sx, sy]) if (sx, sy) != (1.0, 1.0) else b.clone()
        if self.hflip:
            out = self._flip_boxes(out, self.resized[1])
        return wrap(out)

    def inverse_boxes(self, boxes: Any) -> Any:
        """View-frame ``[N, 4]`` XYXY boxes (tensor or ``Boxes``) -> source frame."""
        b, wrap = _unwrap(boxes)
        out = self._flip_boxes(b, self.resized[1]) if self.hflip else b.clone()
        sx, sy = self.scale_xy
        if (sx, sy) != (1.0, 1.0):
            out = out / out.new_tensor([sx, sy, sx, sy])
        return wrap(out)

    # ------------------------------------------------------------------ masks
    def apply_masks(self, masks: Any) -> Any:
        """Source-frame ``[N, H, W]`` masks (tensor or ``BitMasks``) -> view frame (resize, then flip)."""
        m, wrap = _unwrap(masks)
        m = _resize_masks(m, tuple(self.resized))
        return wrap(m.flip(-1) if self.hflip else m)

    def inverse_masks(self, masks: Any) -> Any:
        """View-frame ``[N, H, W]`` masks (tensor or ``BitMasks``) -> source frame (flip, then resize)."""
        m, wrap = _unwrap(masks)
        if self.hflip:
            m = m.flip(-1)
        return wrap(_resize_masks(m, tuple(self.source)))

    # ------------------------------------------------------------------ feature maps
    def apply_feature_map(
        self, feat: torch.Tensor, stride: int, valid_width: Optional[Union[int, Sequence[int]]] = None
    ) -> torch.Tensor:
        """Source-frame feature map ``[B, C, H, W]`` at ``stride`` -> view frame (a flip within the valid
        width).

        Only flips are supported for feature maps (a resize between frames cannot be undone exactly): raises
        ``ValueError`` if ``source != resized``. ``valid_width`` defaults to ``ceil(view width / stride)``.
        """
        if tuple(self.source) != tuple(self.resized):
            raise ValueError("feature maps can only be mapped between frames of the same size (flip only)")
        if not self.hflip:
            return feat
        if valid_width is None:
            valid_width = level_width(self.resized[1], stride)
        return flip_feature_map(feat, valid_width)

    def inverse_feature_map(
        self, feat: torch.Tensor, stride: int, valid_width: Optional[Union[int, Sequence[int]]] = None
    ) -> torch.Tensor:
        """View-frame feature map -> source frame (a flip is its own inverse)."""
        return self.apply_feature_map(feat, stride, valid_width)


# ---------------------------------------------------------------------- views
def _to_chw(img: np.ndarray) -> torch.Tensor:
    if img.ndim == 2:
        img = img[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def make_unlabeled_views(
    image: np.ndarray,
    rng: np.random.Generator,
    resize_to: Optional[Tuple[int, int]] = None,
    num_teacher_copies: int = 2,
    teacher_flip: bool = True,
    student_flip: bool = False,
    base_flip_prob: float = 0.5,
    brightness: float = 0.15,
    contrast: float = 0.15,
    hue: float = 0.05,
    erase_prob: float = 0.9,
    erase_max_patches: int = 10,
    erase_area: Tuple[float, float] = (0.001, 0.004),
    erase_aspect: Tuple[float, float] = (0.2, 5.0),
    image_format: str = "BGR",
) -> Dict[str, Any]:
    """Teacher and student views of one uint8 ``HxWxC`` image.

    Returns a dict with
      - ``base_transform``: :class:`ViewTransform` original image -> base view (shared resize + random
        h-flip);
      - ``base_image``: the unperturbed base view, ``CHW`` uint8 tensor;
      - ``teacher_views`` / ``teacher_transforms``: ``[copy0, copy0 flipped, copy1, copy1 flipped, ...]``
        (``2K`` views with ``teacher_flip``, else ``K``), each copy independently jittered and erased;
      - ``student_view`` / ``student_transform``: one more independent copy (flipped only if
        ``student_flip``).
    View transforms map from the base frame (same size), so flipped views map back to view 0's frame exactly.
    """
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    src_hw = (int(image.shape[0]), int(image.shape[1]))
    base = image
    if resize_to is not None and tuple(resize_to) != src_hw:
        base = cv2.resize(image, (int(resize_to[1]), int(resize_to[0])), interpolation=cv2.INTER_LINEAR)
        if image.ndim == 3 and base.ndim == 2:
            base = base[:, :, None]
    base_hw = (int(base.shape[0]), int(base.shape[1]))
    base_flip = bool(rng.random() < base_flip_prob)
    if base_flip:
        base = base[:, ::-1]
    base = np.ascontiguousarray(base)

    def perturb(img: np.ndarray) -> np.ndarray:
        img = color_jitter(img, rng, brightness, contrast, hue, image_format)
        return random_erase(img, rng, erase_prob, erase_max_patches, erase_area, erase_aspect)

    same = ViewTransform(base_hw, base_hw, False)
    flipped = ViewTransform(base_hw, base_hw, True)
    teacher_views, teacher_transforms = [], []
    for _ in range(num_teacher_copies):
        copy = perturb(base)
        teacher_views.append(_to_chw(copy))
        teacher_transforms.append(same)
        if teacher_flip:
            teacher_views.append(_to_chw(copy[:, ::-1]))
            teacher_transforms.append(flipped)
    student = perturb(base)
    if student_flip:
        student = student[:, ::-1]
    return {
        "base_transform": ViewTransform(src_hw, base_hw, base_flip),
        "base_image": _to_chw(base),
        "teacher_views": teacher_views,
        "teacher_transforms": teacher_transforms,
        "student_view": _to_chw(student),
        "student_transform": flipped if student_flip else same,
    }
