"""Readers of the overlapping cervical cytology data (ISBI 2014/2015) into per-image instance mask stacks.

Two sources give the same (cytoplasm, nucleus) stacks and then go through :mod:`mmt_psm.instance.coco_io`:

* the staged layout under ``<source>/<subset>/`` (``images/<name>.png``, ``cyto_masks/<name>.npz``
  with bit-packed overlapping masks, ``nuclei/<name>_nuclei.png`` binary; datasets/README.md);
* the official ISBI 2014 ground-truth file ``isbi_train_GT.mat`` (``train_Cytoplasm``/``train_Nuclei``).

Nucleus instances are the 8-connected components of the binary nucleus mask (``NUCLEUS_CONNECTIVITY``).
With 8 connectivity the counts equal ``n_nuclei_cc`` of ``isbi2015/frames.tsv`` (4 connectivity gives the same
there) and, on the 45 synthetic ISBI 2014 images, equal the official ``CellNum`` (4 connectivity splits one
nucleus in train_35 and one in train_45 into two).
"""
from __future__ import annotations

import csv
import os
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import cv2
import numpy as np
import scipy.io
import scipy.ndimage as ndi

from mmt_psm.instance.coco_io import image_record, masks_to_annotations

CYTOPLASM_ID = 1
NUCLEUS_ID = 2
# Connectivity of nucleus components: 8 (3x3 structuring element). See the module docstring for why.
NUCLEUS_CONNECTIVITY = 8

Masks = Tuple[np.ndarray, np.ndarray]  # (cytoplasm (N,H,W) bool, nuclei (M,H,W) bool)


def load_cyto_npz(path: str) -> np.ndarray:
    """Overlapping cytoplasm masks (N, H, W) bool from a bit-packed ``.npz`` (keys ``packed``, ``shape``)."""
    with np.load(path) as z:
        n, h, w = (int(v) for v in z["shape"])
        masks = np.unpackbits(z["packed"], axis=-1)[..., :w].astype(bool)
    if masks.shape != (n, h, w):
        raise ValueError(f"{path}: unpacked masks have shape {masks.shape}, file says {(n, h, w)}")
    return masks


def nucleus_instances(binary: np.ndarray) -> np.ndarray:
    """Split a binary nucleus mask (H, W) into instances (M, H, W) bool: its 8-connected components.

    Components are ordered by ``scipy.ndimage.label`` (raster order of their first pixel), so output is
    deterministic.
    """
    structure = np.ones((3, 3), bool) if NUCLEUS_CONNECTIVITY == 8 else None
    labels, n = ndi.label(np.asarray(binary) > 0, structure=structure)
    return labels[None] == np.arange(1, n + 1)[:, None, None]


def read_gray(path: str) -> np.ndarray:
    """Read an image file unchanged (no colour conversion); FileNotFoundError / ValueError name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"could not decode image file: {path}")
    return img


def read_staged(subset_dir: str, name: str) -> Masks:
    """(cytoplasm, nuclei) stacks of image ``name`` of a staged subset (e.g. ``.../cervical/isbi2015``)."""
    cyto = load_cyto_npz(os.path.join(subset_dir, "cyto_masks", f"{name}.npz"))
    nuclei = nucleus_instances(read_gray(os.path.join(subset_dir, "nuclei", f"{name}_nuclei.png")))
    if nuclei.shape[1:] != cyto.shape[1:]:
        raise ValueError(f"{subset_dir}/{name}: nuclei {nuclei.shape[1:]} vs cytoplasm {cyto.shape[1:]}")
    return cyto, nuclei


def read_official_mat(mat_path: str) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``(name, cytoplasm, nuclei)`` for each image of the ISBI 2014 ``isbi_train_GT.mat``.

    ``train_Cytoplasm`` is a (K, 1) cell array; entry i is an (N_i, 1) cell array of HxW masks.
    ``train_Nuclei`` entry i is one binary HxW mask. Image i (0-based) is named ``train_{i+1:02d}``, the file
    names of the challenge's training images.
    """
    if not os.path.isfile(mat_path):
        raise FileNotFoundError(f"ISBI 2014 ground-truth file not found: {mat_path}")
    mat = scipy.io.loadmat(mat_path)
    cyto_cells, nuc_cells = mat["train_Cytoplasm"], mat["train_Nuclei"]
    if cyto_cells.shape[0] != nuc_cells.shape[0]:
        raise ValueError(f"{mat_path}: {cyto_cells.shape[0]} cytoplasm entries, {nuc_cells.shape[0]} nuclei")
    for i in range(cyto_cells.shape[0]):
        cells = cyto_cells[i, 0]
        cyto = np.stack([np.asarray(c[0]) > 0 for c in cells.reshape(-1, 1)])
        nuclei = nucleus_instances(np.asarray(nuc_cells[i, 0]))
        yield f"train_{i + 1:02d}", cyto, nuclei


def read_frames_tsv(path: str) -> List[Dict[str, str]]:
    """Rows of ``isbi2015/frames.tsv`` (columns frame, split, n_cytoplasm, n_nuclei_cc, ...)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def assign_image_ids(file_names: Sequence[str]) -> Dict[str, int]:
    """Deterministic ids: 1-based rank of each file name (relative path) in sorted order."""
    return {fn: i + 1 for i, fn in enumerate(sorted(set(file_names)))}


def coco_records(
    file_name: str,
    image_id: int,
    cyto: np.ndarray,
    nuclei: np.ndarray,
    first_ann_id: int,
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """COCO image record and annotations (cytoplasm then nuclei) of one image; overlaps are kept exactly."""
    h, w = cyto.shape[1:] if len(cyto) else nuclei.shape[1:]
    anns = masks_to_annotations(cyto, CYTOPLASM_ID, image_id, first_ann_id)
    anns += masks_to_annotations(nuclei, NUCLEUS_ID, image_id, first_ann_id + len(anns))
    return image_record(image_id, file_name, h, w), anns
