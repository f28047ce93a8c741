"""Tiny ACDC-like slice data (HDF5 written here, converted by the real converter) and a tiny U-Net config."""
from __future__ import annotations

import os
from typing import Dict, Sequence

import h5py
import numpy as np
from common import REPO
from detectron2.config import CfgNode

from mmt_psm.config import load_config
from mmt_psm.semantic.acdc import convert_acdc
from mmt_psm.semantic.acdc_datasets import register_all_acdc


def heart_slice(h: int, w: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """A slice with an LV disk (3) in a Myo ring (2) and an RV blob (1), noisy intensities, and scribbles."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx = h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-2, 2)
    r = np.hypot(yy - cy, xx - cx)
    label = np.zeros((h, w), np.uint8)
    label[r < 9] = 2
    label[r < 6] = 3
    label[np.hypot(yy - cy, xx - (cx - 12)) < 5] = 1
    image = (0.1 + 0.25 * label + rng.normal(0, 0.03, (h, w))).clip(0, 1).astype(np.float32)
    scribble = np.full((h, w), 4, np.uint16)
    scribble[int(cy), int(cx) - 2: int(cx) + 3] = 3
    scribble[int(cy) - 7, int(cx) - 1: int(cx) + 2] = 2
    scribble[int(cy), int(cx) - 13: int(cx) - 10] = 1
    scribble[1, 1:6] = 0
    return {"image": image, "label": label, "scribble": scribble}


def write_h5_slices(folder: str, patients: Sequence[str], slices: int = 3, size=(40, 48), seed: int = 0) -> None:
    """``<patient>_frame01/_frame10_slice_<s>.h5`` files with keys image/label/scribble."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for p in patients:
        for frame in ("01", "10"):
            for s in range(slices):
                with h5py.File(os.path.join(folder, f"{p}_frame{frame}_slice_{s}.h5"), "w") as f:
                    for k, v in heart_slice(*size, rng).items():
                        f.create_dataset(k, data=v)


def tiny_acdc(root: str, prefix: str = "tinyacdc") -> str:
    """Write 8 patients ACDC never had (patient100-107: none of DESIGN's fixed test patients, so every 4th,
    patient103 and patient107, is a test patient), convert them and register ``<prefix>_*``; returns the
    converted folder."""
    src, out = os.path.join(root, "h5"), os.path.join(root, "acdc")
    write_h5_slices(src, [f"patient1{i:02d}" for i in range(8)])
    convert_acdc(src, out, seeds=(1, 2, 3), num_labeled=3)
    register_all_acdc(out, prefix=prefix)
    return out


def tiny_semantic_cfg(output_dir: str, meta: str = "SemanticSegmentor", prefix: str = "tinyacdc") -> CfgNode:
    """configs/acdc/Base-ACDC-UNet.yaml shrunk to a 3-stage U-Net on 32 x 32 slices, 3 iterations."""
    cfg = load_config(os.path.join(REPO, "configs", "acdc", "Base-ACDC-UNet.yaml"))  # device resolved (CPU here)
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", meta, "MODEL.UNET.CHANNELS", (4, 8, 16), "MODEL.UNET.DROPOUT", (0.0, 0.1, 0.2),
        "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res1", "res2", "res3"], "INPUT.FIXED_SIZE", (32, 32),
        "DATASETS.TRAIN", (f"{prefix}_p3_seed1_labeled",), "DATASETS.TEST", (),
        "SOLVER.MAX_ITER", 3, "SOLVER.WARMUP_ITERS", 0, "SOLVER.CHECKPOINT_PERIOD", 100, "SOLVER.BASE_LR", 0.01,
        "SEMI.IMS_PER_BATCH_LABELED", 2, "DATALOADER.STREAM_SEED", 3, "SEED", 3, "OUTPUT_DIR", output_dir,
    ])
    if meta != "SemanticSegmentor":
        weak = "scribble" if meta == "MixedSupervisionSegmentor" else "unlabeled"
        cfg.merge_from_list(["DATASETS.TRAIN_UNLABELED", (f"{prefix}_p3_seed1_{weak}",),
                             "SEMI.IMS_PER_BATCH_UNLABELED", 2, "SEMI.RAMP_UP_ITERS", 2, "SEMI.UNSUP_WEIGHT", 1.0])
    return cfg
