"""Shared helpers of the tests: tiny synthetic data sets in a temp dir and a tiny CPU config."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

from detectron2.config import CfgNode

from mmt_psm.config import load_config
from mmt_psm.instance.datasets import register_cell_coco
from mmt_psm.instance.synthetic import write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("MMT_PSM_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))


def tiny_synthetic(root: str, prefix: str = "tiny", size: int = 128, n_train: int = 4, n_test: int = 2,
                   n_unlabeled: int = 4) -> Tuple[str, str, str]:
    """Write and register ``<prefix>_train/_test/_unlabeled`` synthetic cell data sets under ``root``."""
    paths = write_synthetic_dataset(root, n_train, n_test, n_unlabeled, size=size, seed=0)
    names = []
    for split, path in paths.items():
        name = f"{prefix}_{split}"
        register_cell_coco(name, path, os.path.join(root, "images"), "tests/common.py",
                           strip_annotations=split == "unlabeled")
        names.append(name)
    return tuple(names)


def tiny_cfg(output_dir: str, prefix: str = "tiny", meta: str = "GeneralizedRCNN", size: int = 128) -> CfgNode:
    """The quickstart config shrunk to ``size`` px, 2+2 images per step, for tests (CPU, seconds per step)."""
    # load_config: the device resolved as every entry point does it (no CUDA here -> the CPU)
    cfg = load_config(os.path.join(REPO, "configs", "quickstart", "Base-Quickstart.yaml"))
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", meta,
        "DATASETS.TRAIN", (f"{prefix}_train",),
        "DATASETS.TEST", (),  # evaluation is tested on its own; set it where a test needs it
        "INPUT.MIN_SIZE_TRAIN", (size,), "INPUT.MAX_SIZE_TRAIN", size,
        "INPUT.MIN_SIZE_TEST", size, "INPUT.MAX_SIZE_TEST", size,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 200, "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 400,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64, "MODEL.MMT_PSM.PROPOSAL_BATCH_SIZE", 64,
        "MODEL.FPN.OUT_CHANNELS", 64, "MODEL.ROI_BOX_HEAD.FC_DIM", 128, "MODEL.MMT_PSM.MGD_ADAPTOR_DIM", 32,
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.BASE_LR", 0.01, "SOLVER.WARMUP_ITERS", 0,
        "SOLVER.MAX_ITER", 6, "SOLVER.STEPS", (), "SOLVER.CHECKPOINT_PERIOD", 3,
        "TEST.EVAL_PERIOD", 0, "DATALOADER.STREAM_SEED", 7, "SEED", 3, "OUTPUT_DIR", output_dir,
    ])
    if meta == "MMTPSMRCNN":
        cfg.merge_from_list([
            "DATASETS.TRAIN_UNLABELED", (f"{prefix}_unlabeled",),
            "SEMI.IMS_PER_BATCH_LABELED", 1, "SEMI.IMS_PER_BATCH_UNLABELED", 1,
            "SEMI.BURN_IN_ITERS", 2, "SEMI.EMA_START_ITER", 1, "SEMI.RAMP_UP_ITERS", 2,
            "SEMI.RAMP_DOWN_ITERS", 0, "SEMI.UNSUP_WEIGHT", 1.0,
        ])
    return cfg


def unlabeled_view_batch(cfg: CfgNode, dataset: str, n: int, seed: int = 0) -> List[Dict[str, Any]]:
    """The first ``n`` images of ``dataset`` through MMT-PSM's view mapper (numpy seeded), marked unlabeled."""
    import numpy as np
    from detectron2.data import DatasetCatalog

    from mmt_psm.instance.view_mapper import MMTPSMViewMapper

    np.random.seed(seed)
    mapper = MMTPSMViewMapper(cfg)
    batch = [mapper(d) for d in DatasetCatalog.get(dataset)[:n]]
    for d in batch:
        d["labeled"] = False
    return batch


def protocol_run_dir(tmp_path, records, max_iter: int) -> str:
    """A finished-looking protocol run folder: config.yaml with SOLVER.MAX_ITER and metrics.json of ``records``."""
    import json

    d = tmp_path / "run"
    d.mkdir()
    (d / "config.yaml").write_text(f"SOLVER:\n  MAX_ITER: {max_iter}\n")
    (d / "metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(d)
