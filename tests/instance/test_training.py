"""A tiny Mask R-CNN learns: on a fixed batch its loss is finite and falls."""
import math
import random

import numpy as np
import torch
from common import tiny_cfg, tiny_synthetic
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from mmt_psm.instance.mapper import CellDatasetMapper


def test_loss_is_finite_and_falls_on_a_fixed_batch(tmp_path):
    tiny_synthetic(str(tmp_path), prefix="fit")
    cfg = tiny_cfg(str(tmp_path / "out"), "fit")
    np.random.seed(0)  # the mapper's augmentations draw from numpy's global RNG
    random.seed(0)
    torch.manual_seed(0)
    model = build_model(cfg)
    mapper = CellDatasetMapper(cfg, True)
    batch = [mapper(d) for d in DatasetCatalog.get("fit_train")[:2]]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    totals = []
    with EventStorage():
        for _ in range(30):
            losses = model(batch)
            total = sum(losses.values())
            assert all(math.isfinite(float(v)) for v in losses.values()), losses
            opt.zero_grad()
            total.backward()
            opt.step()
            totals.append(float(total))
    # RPN/ROI sampling makes single steps noisy: compare the means of the first and last 5 steps
    assert sum(totals[-5:]) / 5 < 0.85 * sum(totals[:5]) / 5, totals
