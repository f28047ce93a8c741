"""Drawing of predictions, ground truth and teacher pseudo-labels with Detectron2's ``Visualizer``.

Shared by ``tools/visualize.py`` (predictions of a trained model), ``make quickstart`` and the pseudo-label
hook (:class:`mmt_psm.instance.vis_hook.PseudoLabelVisHook`). All images returned here are ``HxWx3`` uint8 RGB.
Images are read with :func:`mmt_psm.instance.mapper.read_image_checked`, so 16-bit and grayscale files work as in
training (grayscale shown as RGB).
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.layers import paste_masks_in_image
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer

from mmt_psm.core.image_io import is_image_file
from mmt_psm.instance.mapper import read_image_checked

__all__ = [
    "cfg_metadata",
    "chw_to_rgb",
    "draw_dataset_predictions",
    "draw_ground_truth",
    "draw_image_predictions",
    "draw_instances",
    "draw_pseudo_labels",
    "hconcat",
    "list_images",
    "paste_instance_masks",
    "predict_instances",
    "preserve_global_rng",
    "write_png",
]

logger = logging.getLogger(__name__)



@contextlib.contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Restore numpy's and Python's global RNG after the block: Visualizer draws random colours, and drawing
    during training must not change the training run's random streams (exact resume)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def cfg_metadata(cfg: CfgNode, prefer: str = "TRAIN") -> Optional[Metadata]:
    """Metadata (class names) of the config's first ``DATASETS.<prefer>`` data set (falling back to the other of
    TRAIN/TEST); ``None`` when the config names no data set."""
    order = ("TRAIN", "TEST") if prefer == "TRAIN" else ("TEST", "TRAIN")
    for key in order:
        names = cfg.DATASETS.get(key, ())
        if names:
            return MetadataCatalog.get(names[0])
    return None


def to_rgb(image: np.ndarray, image_format: str) -> np.ndarray:
    """``HxW``/``HxWx1``/``HxWx3`` image in ``image_format`` -> ``HxWx3`` uint8 RGB (grayscale replicated)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2).astype(np.uint8)
    return np.ascontiguousarray(convert_image_to_rgb(image, image_format)).astype(np.uint8)


def chw_to_rgb(image: torch.Tensor, image_format: str) -> np.ndarray:
    """A model input (``CxHxW`` tensor, 1 or 3 channels, in ``image_format``) -> ``HxWx3`` uint8 RGB."""
    return to_rgb(image.detach().to("cpu").permute(1, 2, 0).numpy().clip(0, 255).astype(np.uint8), image_format)


def hconcat(images: Sequence[np.ndarray]) -> np.ndarray:
    """Images side by side, shorter ones padded with black at the bottom."""
    h = max(im.shape[0] for im in images)
    padded = [np.pad(im, ((0, h - im.shape[0]), (0, 0), (0, 0))) for im in images]
    return np.concatenate(padded, axis=1)


def write_png(path: str, image_rgb: np.ndarray) -> str:
    """Write an RGB image as PNG (creating the folder); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, np.ascontiguousarray(image_rgb[:, :, ::-1])):
        raise OSError(f"could not write {path}")
    return path


def _draw_title(vis: Visualizer, title: Optional[str]) -> None:
    if title:
        vis.draw_text(title, (2, 2), horizontal_alignment="left", color="w")


def paste_instance_masks(instances: Instances, image_size: Sequence[int], threshold: float = 0.5) -> Instances:
    """A CPU copy of raw detections whose ``pred_masks`` (``N x 1 x M x M`` probabilities relative to the boxes,
    as the ROI heads return them) are pasted into ``image_size`` (h, w) as boolean masks."""
    out = Instances(tuple(int(s) for s in image_size))
    instances = instances.to("cpu")
    for name, value in instances.get_fields().items():
        if name != "pred_masks":
            out.set(name, value)
    if instances.has("pred_masks"):
        masks = instances.pred_masks
        masks = masks[:, 0] if masks.dim() == 4 else masks
        pasted = paste_masks_in_image(masks.float(), instances.pred_boxes, out.image_size, threshold=threshold)
        out.pred_masks = pasted.bool()
    return out


def draw_instances(
    image_rgb: np.ndarray, instances: Instances, metadata: Optional[Metadata] = None, title: Optional[str] = None
) -> np.ndarray:
    """Predictions (``pred_boxes``/``pred_classes``/``scores``/image-sized ``pred_masks``) drawn on an image."""
    vis = Visualizer(image_rgb, metadata)
    if len(instances):
        vis.draw_instance_predictions(instances.to("cpu"))
    _draw_title(vis, title)
    return vis.output.get_image()


def draw_ground_truth(
    image_rgb: np.ndarray, dataset_dict: Dict[str, Any], metadata: Optional[Metadata] = None,
    title: Optional[str] = None,
) -> np.ndarray:
    """The annotations of a Detectron2 data set dict (boxes, RLE/polygon masks, class names) drawn on an image."""
    vis = Visualizer(image_rgb, metadata)
    vis.draw_dataset_dict(dataset_dict)
    _draw_title(vis, title)
    return vis.output.get_image()


def draw_pseudo_labels(
    unlabeled_dicts: Sequence[Dict[str, Any]],
    detections: Sequence[Instances],
    image_format: str = "BGR",
    metadata: Optional[Metadata] = None,
    max_images: int = 2,
    mask_threshold: float = 0.5,
    title: str = "",
) -> np.ndarray:
    """The teacher's pseudo-labels (detections on ``teacher_views[0]``, masks pasted at ``mask_threshold``)
    drawn on view 0 of the first ``max_images`` unlabeled images, side by side. Each panel says how many
    pseudo-labels it has (an image with none is drawn unannotated, with "0 pseudo-labels")."""
    panels = []
    with preserve_global_rng():
        for d, det in list(zip(unlabeled_dicts, detections))[: max(1, max_images)]:
            view = d["teacher_views"][0]
            image = chw_to_rgb(view, image_format)
            pasted = paste_instance_masks(det, image.shape[:2], mask_threshold)
            label = f"{title}: " if title else ""
            label += f"{len(pasted)} pseudo-label{'' if len(pasted) == 1 else 's'}"
            panels.append(draw_instances(image, pasted, metadata, label))
    return hconcat(panels)


class _Predictor:
    """Detectron2's DefaultPredictor without weight loading: resize like the test loader, run, un-resize."""

    def __init__(self, cfg: CfgNode, model: torch.nn.Module):
        self.model, self.image_format = model, cfg.INPUT.FORMAT
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)

    def __call__(self, image: np.ndarray) -> Instances:
        h, w = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        with torch.no_grad():
            return self.model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def predict_instances(cfg: CfgNode, model: torch.nn.Module, image: np.ndarray) -> Instances:
    """Predictions (CPU, original image frame) of ``model`` on one ``HxWx3`` image in ``cfg.INPUT.FORMAT``."""
    with _eval_mode(model):
        return _Predictor(cfg, model)(image)


def _filter(instances: Instances, score_thresh: float) -> Instances:
    return instances[instances.scores >= score_thresh] if instances.has("scores") else instances


def _unique_path(output_dir: str, stem: str, used: set) -> str:
    name, k = stem, 1
    while name in used:
        name, k = f"{stem}_{k}", k + 1
    used.add(name)
    return os.path.join(output_dir, name + ".png")


def draw_dataset_predictions(
    cfg: CfgNode,
    model: torch.nn.Module,
    dataset_name: str,
    output_dir: str,
    max_images: Optional[int] = None,
    score_thresh: float = 0.5,
) -> List[str]:
    """For the first ``max_images`` images of a registered data set (all when ``None`` or <= 0), write
    ``<output_dir>/<image stem>_gt_pred.png``: ground truth | predictions with score >= ``score_thresh``, each
    panel the original image size. Runs ``model`` as it is (for a teacher-student model wrap the call in
    ``model.evaluate_with(...)``); its train/eval mode is restored. Returns the paths written."""
    dicts = DatasetCatalog.get(dataset_name)
    if max_images is not None and max_images > 0:
        dicts = dicts[:max_images]
    metadata = MetadataCatalog.get(dataset_name)
    paths: List[str] = []
    used: set = set()
    with _eval_mode(model):
        predictor = _Predictor(cfg, model)
        for d in dicts:
            image = read_image_checked(d["file_name"], cfg.INPUT.FORMAT)
            preds = _filter(predictor(image), score_thresh)
            rgb = to_rgb(image, cfg.INPUT.FORMAT)
            n_gt = len(d.get("annotations", []))
            gt = draw_ground_truth(rgb, d, metadata, f"ground truth: {n_gt}")
            pred = draw_instances(rgb, preds, metadata, f"prediction: {len(preds)} (score >= {score_thresh:g})")
            stem = os.path.splitext(os.path.basename(d["file_name"]))[0] + "_gt_pred"
            paths.append(write_png(_unique_path(output_dir, stem, used), hconcat([gt, pred])))
    logger.info(f"wrote {len(paths)} images of {dataset_name} to {output_dir}")
    return paths


def list_images(inputs: Sequence[str]) -> List[str]:
    """Image files named by ``inputs``: folders (their image files), glob patterns or files; sorted, unique."""
    files: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = [os.path.join(item, f) for f in os.listdir(item)]
            files += [f for f in found if os.path.isfile(f) and is_image_file(f)]
        elif os.path.isfile(item):
            files.append(item)
        else:
            files += [f for f in glob.glob(item) if os.path.isfile(f)]
    return sorted(set(files))


def draw_image_predictions(
    cfg: CfgNode,
    model: torch.nn.Module,
    image_paths: Sequence[str],
    output_dir: str,
    score_thresh: float = 0.5,
    metadata: Optional[Metadata] = None,
) -> List[str]:
    """Write ``<output_dir>/<image stem>_pred.png`` (predictions with score >= ``score_thresh``) for each image
    file; class names from ``metadata`` (default: the config's first data set). Returns the paths written."""
    metadata = metadata if metadata is not None else cfg_metadata(cfg, prefer="TEST")
    paths: List[str] = []
    used: set = set()
    with _eval_mode(model):
        predictor = _Predictor(cfg, model)
        for path in image_paths:
            image = read_image_checked(path, cfg.INPUT.FORMAT)
            preds = _filter(predictor(image), score_thresh)
            title = f"prediction: {len(preds)} (score >= {score_thresh:g})"
            drawn = draw_instances(to_rgb(image, cfg.INPUT.FORMAT), preds, metadata, title)
            stem = os.path.splitext(os.path.basename(path))[0] + "_pred"
            paths.append(write_png(_unique_path(output_dir, stem, used), drawn))
    logger.info(f"wrote {len(paths)} images to {output_dir}")
    return paths
